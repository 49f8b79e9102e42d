"""How pyro_dkm modules share Pyro's global parameter store.

A ``PyroModule`` names its parameters by attribute path (``"output.u_loc"``, or
``"mean_dkm.output.u_loc"`` inside a parent ``PyroModule``) and registers them in
Pyro's global parameter store on first use inside a model or guide. Two failure
modes follow, both silent in plain Pyro:

* a store entry under one of our names that is a *different* tensor (left by an
  earlier model, or by a second live model under the same root name) is what
  ``pyro.optim`` then trains, while the module computes with its own tensor;
* a store entry loaded with ``pyro.get_param_store().load(...)`` is ignored by a
  module whose parameters are plain ``nn.Parameter``.

:func:`sync_param_store` settles each of a module's names before it runs:

* the entry is ours: nothing to do;
* the entry was never a pyro_dkm module's parameter (loaded from a file, or set by
  the user with ``pyro.param``): its value is copied into our parameter in place
  (so optimisers holding our tensors stay valid) and the store then holds ours;
  a shape mismatch raises ``ValueError`` naming the entry;
* the entry belonged to a module that no longer exists: it is stale and dropped;
* the entry belongs to another *live* pyro_dkm module: the two share Pyro names.
  We take the name over (so a model evaluated after another one computes with its
  own parameters), and inside an SVI step, where ``pyro.optim`` would then train
  only one of the two, we warn (:class:`ParamStoreCollisionWarning`): nest the
  models in one ``PyroModule`` so their names differ, or give each a ``name``.
"""

from __future__ import annotations

import warnings
import weakref

import pyro
import torch

__all__ = ["ParamStoreCollisionWarning", "sync_param_store"]

#: id(tensor) -> (weak reference to the tensor, weak reference to the pyro_dkm module that
#: registered it); keyed by id since tensors compare elementwise
_OWNER: dict[int, tuple[weakref.ref, weakref.ref]] = {}


def _owner_ref(t: torch.Tensor) -> weakref.ref | None:
    entry = _OWNER.get(id(t))
    if entry is None or entry[0]() is not t:
        return None
    return entry[1]


def _register(t: torch.Tensor, owner_ref: weakref.ref) -> None:
    key = id(t)
    _OWNER[key] = (weakref.ref(t, lambda _r, key=key: _OWNER.pop(key, None)), owner_ref)


class ParamStoreCollisionWarning(UserWarning):
    """Two live pyro_dkm modules use the same Pyro parameter names."""


def _store_name(root, name: str) -> str:
    if name.endswith("_unconstrained"):
        name = name[: -len("_unconstrained")]
    prefix = root._pyro_name + "." if getattr(root, "_pyro_name", "") else ""
    return prefix + name


def _in_svi_step() -> bool:
    """True inside ``SVI.step`` (its parameter capture is a param-only trace)."""
    from pyro.poutine.runtime import _PYRO_STACK
    from pyro.poutine.trace_messenger import TraceMessenger

    return any(isinstance(m, TraceMessenger) and getattr(m, "param_only", False)
               for m in _PYRO_STACK)


def sync_param_store(root) -> None:
    """Make the parameter store hold ``root``'s own parameter objects (see the module
    docstring for the rules). Cheap: one dictionary look-up per parameter."""
    store = pyro.get_param_store()
    ref = None
    shared = []
    for name, p in root.named_parameters():
        if _owner_ref(p) is None:
            ref = ref or weakref.ref(root)
            _register(p, ref)
        if not len(store):
            continue
        key = _store_name(root, name)
        held = store._params.get(key)
        if held is None or held is p:
            continue
        owner_ref = _owner_ref(held)
        owner = owner_ref() if owner_ref is not None else None
        if owner_ref is None:
            # loaded from a file or set by the user: adopt its value
            if held.shape != p.shape:
                raise ValueError(
                    f"the Pyro parameter store holds {key!r} with shape {tuple(held.shape)}, "
                    f"but {type(root).__name__} has shape {tuple(p.shape)} there; call "
                    f"pyro.clear_param_store() or load a store saved from the same model")
            with torch.no_grad():
                p.copy_(held.detach().to(p))
        elif owner is not None and owner is not root:
            shared.append((key, type(owner).__name__))
        del store[key]
    if shared and _in_svi_step():
        warnings.warn(
            f"{len(shared)} Pyro parameter name(s) of this {type(root).__name__} (e.g. "
            f"{shared[0][0]!r}) are used by another live {shared[0][1]} in the same SVI "
            f"step, so pyro.optim trains only one of them. Put the models inside one "
            f"PyroModule (names then follow the attribute path) or give each its own "
            f"name=...", ParamStoreCollisionWarning, stacklevel=3)
