"""The database the application-layer APIs open: the server's own store.

`XENO_DB`, else `sqlite:///$XENO_HOME/xeno.db` (XENO_HOME defaults to `data`,
so without either variable this is the server's default database). Blobs are
sealed with the server's data key when `XENO_DATA_KEY` or `XENO_DATA_KEY_FILE`
is set, or when the server's default key file (`xeno.key` next to a SQLite
database) exists, as the server seals them: without it, the server would refuse
what this layer writes (unsealed blobs, versions without a MAC).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from common.atrest import Sealer, load_key
from common.tensors import Manifest, flatten_state_dict, from_wire
from server.lifecycle.errors import InvalidInputError

if TYPE_CHECKING:
    from common.models import ModelSpec
    from server.store import Store


def default_db_url() -> str:
    url = os.environ.get("XENO_DB", "")
    if url:
        return url
    home = os.environ.get("XENO_HOME", "data")
    return f"sqlite:///{home}/xeno.db"


def open_store(db: str | None = None) -> Store:
    """The store at db (or the default URL), schema migrated to the newest revision."""
    from server.store import Store  # SQLAlchemy: a second of imports, only when opened

    url = db or default_db_url()
    sealer = None
    key_file = os.environ.get("XENO_DATA_KEY_FILE", "") or _default_key_file(url)
    if os.environ.get("XENO_DATA_KEY") or key_file:
        sealer = Sealer(load_key(key_file, "XENO_DATA_KEY"))
    store = Store(url, sealer)
    store.create_schema()
    return store


def _default_key_file(url: str) -> str:
    """The server's own key file for a SQLite database, when it exists ("" otherwise)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return ""
    path = os.path.join(os.path.dirname(os.path.abspath(str(parsed.database))), "xeno.key")
    return path if os.path.exists(path) else ""


def weights_of(
    model_data: Any, architecture: str | None = None
) -> tuple[np.ndarray, Manifest | None, ModelSpec | None]:
    """(flat float32 weights, manifest or None, spec or None) of a module, state dict or flat data.

    The flat wire format (little-endian float32 bytes, or a 1-D array) carries no tensor
    layout: it fits only a model that already exists.
    """
    # torch is imported here, not with the module: opening a store (the desktop app, the
    # admin commands) must not pay seconds for it.
    import torch

    from common.models import ModelSpec, infer_spec

    if isinstance(model_data, torch.nn.Module):
        model_data = model_data.state_dict()
    if isinstance(model_data, Mapping):
        state = dict(model_data)
        bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
        if bad or not state:
            raise InvalidInputError(
                "a state dict maps parameter names to tensors"
                + (f"; not tensors: {', '.join(map(str, bad[:5]))}" if bad else "; it is empty")
            )
        spec = ModelSpec(architecture, {}) if architecture else infer_spec(state)
        return flatten_state_dict(state), Manifest.from_state_dict(state), spec
    if isinstance(model_data, (bytes, bytearray, memoryview)):
        if len(model_data) % 4:
            raise InvalidInputError("the flat wire format is float32: a multiple of 4 bytes")
        return from_wire(bytes(model_data)), None, None
    if isinstance(model_data, np.ndarray):
        if model_data.ndim != 1 or not np.issubdtype(model_data.dtype, np.floating):
            raise InvalidInputError("flat weights are a 1-D float array")
        return model_data.astype(np.float32), None, None
    raise InvalidInputError(
        "model_data must be a torch.nn.Module, a state dict, flat float32 bytes or a 1-D array, "
        f"not {type(model_data).__name__}"
    )
