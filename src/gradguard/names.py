"""The user's names for layers: wrapper prefixes removed.

Wrapping a model renames every parameter and module inside it:

* ``torch.compile`` (``OptimizedModule``) puts the model under ``_orig_mod``;
* ``DistributedDataParallel`` and ``DataParallel`` put it under ``module``;
* FSDP (version 1) wraps units in ``_fsdp_wrapped_module``, activation checkpointing and CPU offload
  wrappers in ``_checkpoint_wrapped_module`` (torch.distributed.algorithms), TorchRec's
  ``DistributedModelParallel`` in ``_dmp_wrapped_module``. FSDP2 (``fully_shard``) renames nothing.

So ``DDP(torch.compile(model))`` reports ``"module._orig_mod.blocks.0.fc"`` for the user's
``"blocks.0.fc"``. :func:`user_name` gives the latter back; every name gradguard prints or records goes
through it. The wrappers' own private segments are removed wherever they appear; ``module`` only at the
front, where DDP/DataParallel put it (as ``torch.nn.modules.utils.consume_prefix_in_state_dict_if_present``
does), since a user's own submodule may be called ``module``.
"""

from __future__ import annotations

# Private attribute names under which torch wrappers keep the wrapped module: removed anywhere.
WRAPPER_SEGMENTS: tuple[str, ...] = (
    "_orig_mod",  # torch.compile
    "_fsdp_wrapped_module",  # FSDP (FullyShardedDataParallel)
    "_checkpoint_wrapped_module",  # checkpoint_wrapper / offload_wrapper
    "_dmp_wrapped_module",  # TorchRec DistributedModelParallel
)
# DDP / DataParallel: a public name, so removed only when it leads the path.
LEADING_SEGMENTS: tuple[str, ...] = ("module",)


def user_name(name: str) -> str:
    """``name`` (a parameter or module path) without the segments that torch wrappers add.

    >>> user_name("module._orig_mod.blocks.0._fsdp_wrapped_module.fc.weight")
    'blocks.0.fc.weight'
    >>> user_name("_orig_mod")  # the wrapped root itself
    ''
    >>> user_name("encoder.module.fc")  # a user's own submodule called "module" stays
    'encoder.module.fc'
    """
    parts = name.split(".")
    start = 0
    while start < len(parts) and (parts[start] in LEADING_SEGMENTS or parts[start] in WRAPPER_SEGMENTS):
        start += 1
    return ".".join(part for part in parts[start:] if part not in WRAPPER_SEGMENTS)
