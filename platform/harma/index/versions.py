"""Index versions: where they live, which exist, what each changed.

    harma index versions URI [--json]       # one line a version: number, URI, images, change

An index root is what `harma index build` writes (version 1, `harma.serve.index` files at the
root). `harma index add` and `harma index delete` (harma.index.update) never touch an existing
version: each writes a whole new index under `<root>/versions/NNNNN/`, its manifest last, naming
its `version`, `parent` (the URI it was made from), `root_uri` and `change` (kind, counts, the
corpus or the ids); a sharded version writes only the shards it changes, under its folder, and
lists the others where they are (harma.index.shards). A replica serving one version keeps serving
it while another is written; serving moves to a version by the Retriever deployment's
`user_config: {index_uri: <version URI>}` (a sharded one: of the same shard count).

One updater at a time writes to a root: a version folder that already holds files is refused.
"""

from __future__ import annotations

from typing import Any

from harma import storage
from harma.serve.index import MANIFEST, read_manifest

VERSIONS = "versions"


def version_uri(root: str, version: int) -> str:
    """Where version `version` of the index at `root` lives (version 1 is the root itself)."""
    if version < 1:
        raise ValueError(f"index versions start at 1, not {version}")
    return root if version == 1 else storage.join(root, VERSIONS, f"{version:05d}")


def root_of(uri: str, manifest: dict[str, Any]) -> str:
    """The root of the versions the index at `uri` belongs to."""
    return manifest.get("root_uri") or uri


def list_versions(root: str) -> list[dict[str, Any]]:
    """Every version under `root`, oldest first: version, uri, built_at, images, captions, parent,
    change (None for version 1). A folder without a manifest (an update still writing, or one that
    failed) is not a version."""
    first = read_manifest(root)
    if first.get("root_uri") not in (None, root):
        raise ValueError(f"{root} is version {first.get('version')} of the index at {first['root_uri']}; "
                         f"list that root")
    found = [(1, root, first)]
    versions = storage.join(root, VERSIONS)
    for path in storage.list_files(versions, suffix="/" + MANIFEST):
        folder = path[: -len(MANIFEST) - 1]
        if folder.rsplit("/", 1)[0].rstrip("/") != versions.rstrip("/"):
            continue  # a shard of a sharded version (versions/NNNNN/shards/MMMMM), not a version
        manifest = read_manifest(folder)
        found.append((int(manifest.get("version", 0)), folder, manifest))
    found.sort(key=lambda item: item[0])
    return [{"version": number, "uri": uri, "built_at": m.get("built_at"), "images": m.get("images"),
             "captions": m.get("captions"), "parent": m.get("parent"), "change": m.get("change"),
             "ann": (m.get("ann") or {}).get("kind", "exact")} for number, uri, m in found]


def next_version(root: str) -> tuple[int, str]:
    """(number, URI) of the version an update of `root` writes next; refused when its folder is
    not empty (another update is writing it, or one failed there: remove the folder)."""
    number = max(v["version"] for v in list_versions(root)) + 1
    uri = version_uri(root, number)
    if storage.list_files(uri):
        raise FileExistsError(f"{uri} already holds files but no finished version (another update is "
                              f"writing it, or one failed there): wait for it, or remove the folder")
    return number, uri


def describe_change(change: dict[str, Any] | None) -> str:
    """One phrase for a version's change."""
    if not change:
        return "built"
    if change["kind"] == "add":
        return f"+{change['added']} images from {change['corpus_uri']}"
    what = f"{len(change['scenes'])} scene(s)" if change.get("scenes") else f"{change['deleted']} id(s)"
    return f"-{change['deleted']} images ({what})"


def format_versions(versions: list[dict[str, Any]]) -> str:
    """The table `harma index versions` prints."""
    lines = [f"{'version':>7}  {'images':>9}  {'captions':>8}  {'ann':<8}  {'built_at':<25}  change / uri"]
    for v in versions:
        lines.append(f"{v['version']:>7}  {v['images']:>9}  {v['captions']:>8}  {v['ann']:<8}  "
                     f"{v['built_at'] or '':<25}  {describe_change(v['change'])}")
        lines.append(f"{'':>7}  {v['uri']}")
    return "\n".join(lines)
