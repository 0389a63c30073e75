"""Integrations with other libraries. Each submodule imports its library lazily:

* :mod:`torch_r1attn.integrations.hf` — transformers ``attn_implementation="r1attn"``
  (:func:`~torch_r1attn.integrations.hf.register`, or import
  :mod:`torch_r1attn.integrations.hf_register`).
"""
