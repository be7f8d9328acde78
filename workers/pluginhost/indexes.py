"""Python package indexes as plugin registries: pages, the client, wheels and search.

A registry is a standard Python package index (PEP 503 HTML, PEP 691 JSON). :class:`PackageIndex`
lists a project's wheels, downloads one and checks its sha256 against the index before the file
is opened; :func:`unpack_wheel` extracts it refusing unsafe members; :func:`search` reads each
candidate's manifest to list plugins. Nothing here imports or runs a plugin's code: the folder
found is checked like any other (``admin.install``). Sources (folders, archives, git) are in
``sources.py``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import shutil
import stat
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from email.parser import BytesParser
from html.parser import HTMLParser
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Final

import structlog
from packaging.specifiers import SpecifierSet
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from pydantic import ValidationError

from schemas.manifest import Manifest
from workers.pluginhost.sources import CREDENTIALS, TIMEOUT, redact_url
from workers.pluginhost.trust import MANIFEST_FILE, SIGNATURE_FILE, verify_signature
from workers.runtime.errors import (
    NotFoundError,
    PluginError,
    TransientError,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from packaging.version import Version

__all__ = [
    "ACCEPT",
    "IndexFile",
    "PackageIndex",
    "WheelPlugin",
    "describe",
    "fetch_wheel_plugin",
    "matches",
    "newest",
    "parse_project_page",
    "parse_projects_page",
    "read_wheel_plugin",
    "search",
    "unpack_wheel",
]

log = structlog.get_logger(__name__)

#: PEP 691 JSON first; PEP 503 HTML from indexes that only speak that.
ACCEPT: Final = "application/vnd.pypi.simple.v1+json, text/html;q=0.1"
#: The JSON content type of PEP 691.
_JSON_TYPE: Final = "application/vnd.pypi.simple.v1+json"
#: A wheel larger than this once unpacked is refused (a zip bomb, not a plugin).
MAX_UNPACKED_BYTES: Final = 256 * 1024 * 1024


# --- index pages -----------------------------------------------------------------------------


@dataclass(frozen=True)
class IndexFile:
    """One file of a project on an index."""

    filename: str
    url: str
    sha256: str | None
    yanked: bool = False

    @property
    def wheel(self) -> tuple[str, Version] | None:
        """(canonical project name, version) of a pure-Python wheel; ``None`` otherwise."""
        if not self.filename.endswith(".whl"):
            return None
        try:
            name, version, _, tags = parse_wheel_filename(self.filename)
        except InvalidWheelFilename:
            return None
        if not any(tag.platform == "any" and tag.abi == "none" for tag in tags):
            return None  # built for one platform: plugins are pure Python
        return name, version


class _Links(HTMLParser):
    """Every ``<a>`` of a page: its attributes and text."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[dict[str, str | None], str]] = []
        self._open: dict[str, str | None] | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self._open, self._text = dict(attrs), []

    def handle_data(self, data: str) -> None:
        if self._open is not None:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "a" and self._open is not None:
            self.links.append((self._open, "".join(self._text).strip()))
            self._open = None


def _is_json(content_type: str) -> bool:
    return content_type.split(";")[0].strip().lower() == _JSON_TYPE


def parse_project_page(body: bytes, content_type: str, page_url: str) -> list[IndexFile]:
    """A project page's files (PEP 691 JSON or PEP 503 HTML), URLs made absolute."""
    if _is_json(content_type):
        data = json.loads(body)
        return [
            IndexFile(
                filename=item["filename"],
                url=urllib.parse.urljoin(page_url, item["url"]),
                sha256=(item.get("hashes") or {}).get("sha256"),
                yanked=bool(item.get("yanked")),
            )
            for item in data.get("files", [])
        ]
    parser = _Links()
    parser.feed(body.decode("utf-8", errors="replace"))
    files = []
    for attrs, text in parser.links:
        href = attrs.get("href")
        if not href:
            continue
        url, _, fragment = urllib.parse.urljoin(page_url, href).partition("#")
        hashes = dict(part.partition("=")[::2] for part in fragment.split("&") if part)
        filename = text or urllib.parse.unquote(url.rsplit("/", 1)[-1])
        files.append(IndexFile(filename, url, hashes.get("sha256"), yanked="data-yanked" in attrs))
    return files


def parse_projects_page(body: bytes, content_type: str) -> list[str]:
    """The project names the index root lists (PEP 691 JSON or PEP 503 HTML)."""
    if _is_json(content_type):
        return [item["name"] for item in json.loads(body).get("projects", [])]
    parser = _Links()
    parser.feed(body.decode("utf-8", errors="replace"))
    return [text for _, text in parser.links if text]


def newest(
    files: Iterable[IndexFile], specifier: SpecifierSet, *, above: Version | None = None
) -> list[tuple[Version, IndexFile]]:
    """Pure wheels whose version ``specifier`` admits (and newer than ``above``), newest first.

    Yanked files count only when the specifier pins their version (PEP 592).
    """
    pinned = {s.version for s in specifier if s.operator in ("==", "===")}
    chosen: dict[Version, IndexFile] = {}
    for file in files:
        wheel = file.wheel
        if wheel is None:
            continue
        version = wheel[1]
        if file.yanked and str(version) not in pinned:
            continue
        if above is not None and version <= above:
            continue
        if specifier.contains(version, prereleases=bool(pinned) or None):
            chosen.setdefault(version, file)
    return sorted(chosen.items(), key=lambda item: item[0], reverse=True)


# --- the index client ------------------------------------------------------------------------


class PackageIndex:
    """One configured index; ``${secret:…}`` in its URL are resolved per request by ``resolve``."""

    def __init__(self, url: str, *, resolve: Callable[[str], str] | None = None) -> None:
        """``url`` as configured (secret references unresolved); ``resolve`` resolves them."""
        self._configured = url if url.endswith("/") else f"{url}/"
        self._resolve = resolve
        #: The URL safe to log and show: the password replaced.
        self.shown = redact_url(self._configured)

    def _credentials(self) -> tuple[str, str | None]:
        """(the index URL without credentials, a Basic ``Authorization`` value or None)."""
        url = self._resolve(self._configured) if self._resolve else self._configured
        match = CREDENTIALS.match(url)
        if match is None:
            return url, None
        pair = f"{urllib.parse.unquote(match['user'])}:{urllib.parse.unquote(match['password'])}"
        token = base64.b64encode(pair.encode()).decode()
        return f"{match['scheme']}{match['rest']}", f"Basic {token}"

    def _get(self, url: str, base: str, auth: str | None) -> tuple[bytes, str, str]:
        """(body, content type, final URL) of ``url``; ``NotFoundError`` on 404."""
        headers = {"Accept": ACCEPT, "User-Agent": "cul8er"}
        same_host = urllib.parse.urlsplit(url).netloc == urllib.parse.urlsplit(base).netloc
        if auth and same_host:
            # Credentials go only to the index's own host, never to a file host it links to.
            headers["Authorization"] = auth
        request = urllib.request.Request(url, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT) as answer:
                return answer.read(), answer.headers.get("Content-Type", ""), answer.geturl()
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                raise NotFoundError(f"{redact_url(url)} answered 404") from exc
            raise TransientError(f"index {self.shown} answered {exc.code} for {url}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise TransientError(f"index {self.shown} unreachable: {exc}") from exc

    def projects(self) -> list[str]:
        """Every project the index lists."""
        base, auth = self._credentials()
        body, content_type, _ = self._get(base, base, auth)
        return parse_projects_page(body, content_type)

    def files(self, project: str) -> list[IndexFile]:
        """The files of ``project`` (``[]`` when the index does not have it)."""
        base, auth = self._credentials()
        try:
            body, content_type, final = self._get(
                f"{base}{canonicalize_name(project)}/", base, auth
            )
        except NotFoundError:
            return []
        return parse_project_page(body, content_type, final)

    def download(self, file: IndexFile, into: Path) -> Path:
        """Download ``file`` into ``into``; its sha256 must be the index's before it is used.

        Raises:
            PluginError: the index gives no sha256, or the file's differs (both named).
        """
        name = canonicalize_name(file.filename.split("-")[0])
        if not file.sha256:
            raise PluginError(
                f"{file.filename} on {self.shown} has no sha256 in the index; refused",
                plugin_name=name,
            )
        base, auth = self._credentials()
        body, _, _ = self._get(file.url, base, auth)
        path = into / Path(file.filename).name
        path.write_bytes(body)
        actual = hashlib.sha256(body).hexdigest()
        if actual != file.sha256.lower():
            path.unlink()
            raise PluginError(
                f"{file.filename} from {self.shown}: sha256 {actual} but the index says "
                f"{file.sha256}; refused",
                plugin_name=name,
            )
        log.info("plugin_wheel_downloaded", index=self.shown, file=file.filename, sha256=actual)
        return path


# --- wheels ----------------------------------------------------------------------------------


def _member_path(wheel: Path, info: zipfile.ZipInfo) -> PurePosixPath:
    name = info.filename.replace("\\", "/")
    path = PurePosixPath(name)
    refused = f"unsafe wheel {wheel.name}: member {info.filename!r}"
    if path.is_absolute() or (len(name) > 1 and name[1] == ":"):
        raise PluginError(f"{refused} has an absolute path", plugin_name=wheel.name)
    if ".." in path.parts:
        raise PluginError(f"{refused} leaves the archive ('..')", plugin_name=wheel.name)
    kind = stat.S_IFMT(info.external_attr >> 16)
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise PluginError(f"{refused} is a link or special file", plugin_name=wheel.name)
    return path


def unpack_wheel(wheel: Path, into: Path) -> Path:
    """Extract ``wheel`` into ``into`` after checking every member; answer ``into``.

    Raises:
        PluginError: a member is absolute, leaves the folder, is a link, or the wheel is
            unreadable or unpacks past :data:`MAX_UNPACKED_BYTES`.
    """
    try:
        with zipfile.ZipFile(wheel) as archive:
            members = [(info, _member_path(wheel, info)) for info in archive.infolist()]
            if sum(info.file_size for info, _ in members) > MAX_UNPACKED_BYTES:
                raise PluginError(f"wheel {wheel.name} is too large", plugin_name=wheel.name)
            for info, relative in members:
                dest = into / relative
                if info.is_dir():
                    dest.mkdir(parents=True, exist_ok=True)
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as src, dest.open("wb") as out:
                    shutil.copyfileobj(src, out)
    except (zipfile.BadZipFile, OSError) as exc:
        raise PluginError(f"cannot read wheel {wheel.name}: {exc}", plugin_name=wheel.name) from exc
    return into


@dataclass(frozen=True)
class WheelPlugin:
    """The cul8er plugin inside an unpacked wheel."""

    root: Path
    manifest: Manifest
    manifest_bytes: bytes
    signature: str | None
    keywords: tuple[str, ...]

    def signed(self, trusted_keys: list[bytes]) -> bool:
        """Whether its manifest is signed by one of ``trusted_keys`` (a bad signature: no)."""
        try:
            return verify_signature(
                self.manifest.name,
                self.manifest_bytes,
                self.signature,
                trusted_keys,
                required=False,
            )
        except PluginError:
            return False


def _keywords(unpacked: Path) -> tuple[str, ...]:
    for metadata in unpacked.glob("*.dist-info/METADATA"):
        message = BytesParser().parsebytes(metadata.read_bytes(), headersonly=True)
        words = message.get("Keywords") or ""
        return tuple(w for w in re.split(r"[,\s]+", words) if w)
    return ()


def read_wheel_plugin(unpacked: Path) -> WheelPlugin | None:
    """The plugin folder (the one holding a manifest) of an unpacked wheel, or ``None``.

    Raises:
        PluginError: several folders hold a manifest, or the manifest is invalid.
    """
    skip = (".dist-info", ".data")
    folders = [unpacked] + [
        d for d in sorted(unpacked.iterdir()) if d.is_dir() and not d.name.endswith(skip)
    ]
    roots = [d for d in folders if (d / MANIFEST_FILE).is_file()]
    if not roots:
        return None
    if len(roots) > 1:
        found = ", ".join(r.name for r in roots)
        raise PluginError(f"wheel holds several plugins ({found})", plugin_name=roots[0].name)
    root = roots[0]
    raw = (root / MANIFEST_FILE).read_bytes()
    try:
        manifest = Manifest.model_validate_json(raw)
    except ValidationError as exc:
        raise PluginError(f"invalid {MANIFEST_FILE}: {exc}", plugin_name=root.name) from exc
    signature = None
    with contextlib.suppress(OSError, UnicodeDecodeError):
        signature = (root / SIGNATURE_FILE).read_text().strip() or None
    return WheelPlugin(root, manifest, raw, signature, _keywords(unpacked))


def describe(
    plugin: WheelPlugin, *, index: PackageIndex, trusted_keys: list[bytes]
) -> dict[str, Any]:
    """What ``cul8er plugin search`` shows of one plugin."""
    manifest = plugin.manifest
    return {
        "name": manifest.name,
        "version": manifest.version,
        "type": manifest.type.value,
        "description": manifest.description,
        "signed": plugin.signed(trusted_keys),
        "keywords": list(plugin.keywords),
        "registry": index.shown,
    }


def matches(plugin: WheelPlugin, project: str, query: str) -> bool:
    """Whether ``query`` is in the project or plugin name, the description or a keyword."""
    needle = query.strip().lower()
    haystack = [project, plugin.manifest.name, plugin.manifest.description, *plugin.keywords]
    return any(needle in text.lower() for text in haystack)


def fetch_wheel_plugin(index: PackageIndex, file: IndexFile, into: Path) -> WheelPlugin:
    """Download ``file`` (sha256 checked), unpack it under ``into`` and find its plugin.

    Raises:
        PluginError: a hash mismatch, an unsafe or unreadable wheel, or no plugin inside.
    """
    wheel = index.download(file, into)
    plugin = read_wheel_plugin(unpack_wheel(wheel, into / "unpacked"))
    if plugin is None:
        raise PluginError(
            f"{file.filename} from {index.shown} holds no {MANIFEST_FILE}",
            plugin_name=file.filename,
        )
    return plugin


def search(
    indexes: list[PackageIndex], query: str, *, trusted_keys: list[bytes]
) -> list[dict[str, Any]]:
    """Plugins whose project or plugin name, description or keywords hold ``query``.

    Each project's newest wheel is downloaded and read (a project holding no cul8er manifest
    is not listed); a project an earlier index lists hides the same one on later indexes.
    """
    seen: set[str] = set()
    found: list[dict[str, Any]] = []
    for index in indexes:
        for project in index.projects():
            key = canonicalize_name(project)
            if key in seen:
                continue
            seen.add(key)
            best = newest(index.files(project), SpecifierSet())
            if not best:
                continue
            with tempfile.TemporaryDirectory(prefix="cul8er-search-") as scratch:
                try:
                    wheel = index.download(best[0][1], Path(scratch))
                    plugin = read_wheel_plugin(unpack_wheel(wheel, Path(scratch) / "unpacked"))
                except PluginError as exc:
                    log.warning("plugin_search_skipped", project=project, error=str(exc))
                    continue
                if plugin is not None and matches(plugin, project, query):
                    found.append(
                        {"project": key, **describe(plugin, index=index, trusted_keys=trusted_keys)}
                    )
    return sorted(found, key=lambda item: (item["name"], item["project"]))
