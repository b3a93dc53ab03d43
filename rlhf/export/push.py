"""Push an exported GGUF to an Ollama server: blob upload (HEAD first, so a re-push sends nothing),
`create` with files + template + parameters + system, then `show` to check what the server holds."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rlhf.errors import UserError

CHUNK = 1 << 20


def normalize_host(host: str | None) -> str:
    """The project's convention (rlhf.ollama.hosts): `--ollama_host`, else $OLLAMA_HOST, else the default."""
    from rlhf.ollama.hosts import parse_hosts

    hosts = parse_hosts(host)
    if len(hosts) != 1:
        raise UserError(f"--ollama_host: push goes to one server; got {len(hosts)} ({', '.join(hosts)})")
    return hosts[0]


def _unreachable(url: str) -> UserError:
    return UserError(f"Ollama is not reachable at {url}: start it with `ollama serve`, or pass --ollama_host URL "
                     "(or set OLLAMA_HOST)")


def sha256_file(path: Path, progress: bool = True) -> str:
    from tqdm import tqdm

    h = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc="sha256",
                                     disable=not progress) as bar:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            bar.update(len(chunk))
    return f"sha256:{h.hexdigest()}"


def _file_chunks(path: Path, progress: bool) -> Iterator[bytes]:
    from tqdm import tqdm

    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc="upload",
                                     disable=not progress) as bar:
        while chunk := f.read(CHUNK):
            bar.update(len(chunk))
            yield chunk


def upload_blob(http: Any, path: Path, digest: str, progress: bool = True) -> bool:
    """Upload `path` as blob `digest` unless the server has it. Returns True when bytes were sent."""
    if http.head(f"/api/blobs/{digest}").status_code == 200:
        return False
    r = http.post(f"/api/blobs/{digest}", content=_file_chunks(path, progress))
    if r.status_code not in (200, 201):
        raise UserError(f"Ollama refused the blob {digest} ({r.status_code}: {r.text.strip()[:200]})")
    return True


def model_exists(client: Any, name: str) -> bool:
    import ollama

    try:
        client.show(name)
    except ollama.ResponseError as e:
        if e.status_code == 404:
            return False
        raise UserError(f"Ollama could not show {name!r}: {e.error}") from None
    return True


def push(gguf_path: Path, name: str, *, template: str, params: dict[str, Any], system: str | None,
         host: str | None = None, force: bool = False, progress: bool = True, timeout: float = 600.0) -> dict[str, Any]:
    """Create model `name` on the Ollama server from the GGUF; refuse to replace one without `force`."""
    import httpx
    import ollama

    url = normalize_host(host)
    client = ollama.Client(host=url, timeout=timeout)
    try:
        with httpx.Client(base_url=url, timeout=timeout) as http:
            exists = model_exists(client, name)
            if exists and not force:
                raise UserError(f"Ollama at {url} already has a model named {name!r}; pass --force true to "
                                "replace it, or choose another --name")
            digest = sha256_file(gguf_path, progress)
            uploaded = upload_blob(http, gguf_path, digest, progress)
            final = client.create(model=name, files={gguf_path.name: digest}, template=template,
                                  parameters=params, system=system, stream=False)
            if getattr(final, "status", "success") != "success":
                raise UserError(f"Ollama could not create {name!r}: {final.status}")
            shown = client.show(name)
    except (httpx.ConnectError, httpx.ConnectTimeout, ConnectionError):
        raise _unreachable(url) from None
    except ollama.ResponseError as e:
        raise UserError(f"Ollama at {url} refused to create {name!r}: {e.error}") from None
    if (shown.template or "") != template:
        raise UserError(f"Ollama at {url} created {name!r} but `show` returns another template; "
                        "check the server version")
    return {"host": url, "digest": digest, "uploaded": uploaded, "replaced": exists,
            "show": {"template": shown.template, "parameters": shown.parameters}}
