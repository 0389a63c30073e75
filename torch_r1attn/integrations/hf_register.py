"""Import this module to make ``attn_implementation="r1attn"`` available in transformers::

    import torch_r1attn.integrations.hf_register  # noqa: F401
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="r1attn")

(It calls :func:`torch_r1attn.integrations.hf.register` once; importing is the side effect.)
"""

from .hf import register

register()
