"""Everything is in pyproject.toml; this file only ships the top-level ``csrc/`` (the CUDA shim
header and seed kernel the LLM proposer and CUDA candidates build against) inside the wheel as
``torch_r1attn/csrc/``. Editable installs read ``csrc/`` in place (see cuda_build._csrc_dir)."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithCsrc(build_py):
    def run(self):
        super().run()
        src = Path(__file__).parent / "csrc"
        dst = Path(self.build_lib) / "torch_r1attn" / "csrc"
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildPyWithCsrc})
