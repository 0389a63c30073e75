"""Candidate kernels for the verifier's tests: ``kernel_source(name)`` returns a file's text or a
mutant of the good kernel (see ``mutants.py``)."""

from pathlib import Path

from .mutants import MUTANTS, source as _mutant_source

KERNELS = Path(__file__).parent


def kernel_source(name: str) -> str:
    return _mutant_source(name) if name in MUTANTS else (KERNELS / name).read_text()
