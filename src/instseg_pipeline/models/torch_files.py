"""Reading torch files that may come from a user: tensors and plain containers, never code.

Every checkpoint or model file the project reads (training checkpoints, ``model.pt``,
``training.model.weights``, a SAM checkpoint, ``instseg-serve`` / ``instseg-predict``
checkpoints) goes through `load_weights_only`: ``torch.load(weights_only=True)``, whose
unpickler accepts tensors, numbers, strings, ``None`` and dicts / lists / tuples of them and
refuses any other Python global (a class instance, ``os.system`` in a ``__reduce__``)
before calling it. A refusal becomes `UnsafeFileError` naming the file and the refused
global, instead of torch's advice to allowlist it, which is the wrong advice for a file
nobody vouches for.
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

# torch's refusal messages start with this; other UnpicklingErrors are damaged files
_REFUSED = "Weights only load failed"
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_UNSUPPORTED = re.compile(r"(Unsupported [^\n]+)")
_ADVICE = ("files that may come from a user are read with torch.load(weights_only=True), "
           "which loads only tensors, numbers, strings and dicts / lists of them. Re-save "
           "it as plain tensors (e.g. torch.save(model.state_dict(), path)) from a copy you "
           "trust")


class UnsafeFileError(ValueError):
    """A file the ``weights_only`` reader refuses: pickled Python objects, or pickle content
    it does not accept (a raw ``pickle.dump``, which may hide objects, or junk)."""


class UnreadableFileError(ValueError):
    """A file that is not a torch save at all, or a truncated / corrupt one."""


def refusal(path: Path, what: str, message: str) -> str:
    """Why torch's ``weights_only`` reader refused ``path``, from its error ``message``:
    the Python global it met (``posix.system``, ``__main__.Thing``) when it names one."""
    found = _GLOBAL.search(message)
    if found:
        return (f"{what} {path}: refused, it holds pickled Python objects ({found.group(1)}); "
                f"{_ADVICE}")
    reason = _UNSUPPORTED.search(message)
    return (f"{what} {path}: refused, it is not a plain tensor file (the weights_only reader "
            f"stopped at: {reason.group(1).strip() if reason else 'unsupported content'}; a "
            f"raw pickle, a corrupt file or objects outside tensors); {_ADVICE}")


def load_weights_only(path: str | Path, what: str = "file") -> Any:
    """The content of the torch file ``path`` (tensors on the CPU), read with ``weights_only``.

    ``what`` names the file's role in messages ("checkpoint", "model file", ...). Raises
    `UnsafeFileError` when the reader refuses it (pickled Python objects, a raw pickle, junk
    it cannot tell from one), `UnreadableFileError` when it is a damaged torch file (e.g.
    truncated); both name ``path``. A missing file raises ``FileNotFoundError``.
    """
    import torch

    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as exc:
        if str(exc).startswith(_REFUSED):
            raise UnsafeFileError(refusal(path, what, str(exc))) from None
        raise _unreadable(path, what, exc) from None
    except Exception as exc:  # torch raises RuntimeError, KeyError, EOFError, ... for junk
        raise _unreadable(path, what, exc) from exc


def _unreadable(path: Path, what: str, exc: BaseException) -> UnreadableFileError:
    return UnreadableFileError(f"{what} {path}: cannot be read as a torch file (truncated or "
                               f"corrupt?): {type(exc).__name__}: {str(exc)[:300]}")
