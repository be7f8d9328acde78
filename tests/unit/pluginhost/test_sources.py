"""Plugin sources without a network: source strings, index pages, wheel unpacking."""

from __future__ import annotations

import json
import stat
import zipfile
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from workers.pluginhost.indexes import (
    IndexFile,
    PackageIndex,
    newest,
    parse_project_page,
    parse_projects_page,
    read_wheel_plugin,
    unpack_wheel,
)
from workers.pluginhost.sources import (
    FolderSource,
    GitSource,
    PipSource,
    RegistrySource,
    parse_source,
    redact_url,
)
from workers.runtime.errors import PluginError, ValidationFailedError

SHA = "ab" * 32


def test_existing_paths_are_folders_or_archives(tmp_path: Path) -> None:
    archive = tmp_path / "hello-0.1.0.tar.gz"
    archive.write_bytes(b"")
    assert parse_source(str(tmp_path)) == FolderSource(tmp_path, archive=False)
    assert parse_source(str(archive)) == FolderSource(archive, archive=True)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("git+https://h.io/acme/hello.git@v1.2.0", ("https://h.io/acme/hello.git", "v1.2.0", None)),
        ("git+https://user@h.io/hello.git", ("https://user@h.io/hello.git", None, None)),
        ("git+ssh://git@h.io/a/b.git@feature/x", ("ssh://git@h.io/a/b.git", "feature/x", None)),
        ("git+file:///srv/r@0123abc#subdirectory=p/hello", ("file:///srv/r", "0123abc", "p/hello")),
        ("git+/srv/repo@main", ("/srv/repo", "main", None)),
    ],
)  # fmt: skip
def test_git_sources(text: str, expected: tuple[str, str | None, str | None]) -> None:
    assert parse_source(text) == GitSource(*expected)


@pytest.mark.parametrize(
    "text",
    ["git+ext::sh -c evil@main", "git+https://h/r.git@v1#subdirectory=../up", "git+@v1"],
)
def test_unsafe_or_empty_git_sources_are_refused(text: str) -> None:
    with pytest.raises(ValidationFailedError):
        parse_source(text)


def test_names_go_to_the_registries_and_the_rest_to_pip() -> None:
    source = parse_source("Cul8er_Hello==0.2.0")
    assert isinstance(source, RegistrySource)
    assert source.name == "cul8er-hello" and source.specifier == SpecifierSet("==0.2.0")
    assert parse_source("hello") == RegistrySource("hello", SpecifierSet(), "hello")
    assert isinstance(parse_source("https://example.org/hello-0.1.0-py3-none-any.whl"), PipSource)
    assert isinstance(parse_source("hello[extra]"), PipSource)


def test_passwords_are_redacted_even_as_secret_references() -> None:
    configured = "https://ci:${secret:registry/password}@pkgs.example.org/simple/"
    assert redact_url(configured) == "https://ci:****@pkgs.example.org/simple/"
    assert redact_url("http://127.0.0.1:8080/simple/") == "http://127.0.0.1:8080/simple/"


def test_credentials_become_a_header_never_part_of_the_url() -> None:
    index = PackageIndex(
        "https://ci:${secret:registry/password}@pkgs.example.org/simple",
        resolve=lambda raw: raw.replace("${secret:registry/password}", "s3cr%40t"),
    )
    url, auth = index._credentials()
    assert url == "https://pkgs.example.org/simple/"
    assert auth == "Basic Y2k6czNjckB0"  # ci:s3cr@t
    assert "s3cr" not in index.shown


def test_html_project_page() -> None:
    page = (
        b"<html><body>"
        b'<a href="/packages/hello-0.1.0-py3-none-any.whl#sha256=' + SHA.encode() + b'">'
        b"hello-0.1.0-py3-none-any.whl</a>"
        b'<a href="../../packages/hello-0.2.0-py3-none-any.whl" data-yanked="">'
        b"hello-0.2.0-py3-none-any.whl</a>"
        b"</body></html>"
    )
    files = parse_project_page(page, "text/html", "http://i.example/simple/hello/")
    first, second = "hello-0.1.0-py3-none-any.whl", "hello-0.2.0-py3-none-any.whl"
    assert files == [
        IndexFile(first, f"http://i.example/packages/{first}", SHA),
        IndexFile(second, f"http://i.example/packages/{second}", None, yanked=True),
    ]


def test_json_project_page_and_projects() -> None:
    wheel_name = "hello-0.1.0-py3-none-any.whl"
    body = json.dumps(
        {
            "meta": {"api-version": "1.0"},
            "name": "hello",
            "files": [
                {"filename": wheel_name, "url": "f/h.whl", "hashes": {"sha256": SHA}},
                {"filename": "hello-0.1.0.tar.gz", "url": "f/h.tgz", "hashes": {}, "yanked": "bad"},
            ],
        }
    ).encode()  # fmt: skip
    kind = "application/vnd.pypi.simple.v1+json"
    files = parse_project_page(body, kind, "https://i.example/simple/hello/")
    assert files[0] == IndexFile(
        "hello-0.1.0-py3-none-any.whl", "https://i.example/simple/hello/f/h.whl", SHA
    )
    assert files[1].yanked and files[1].sha256 is None  # fmt: skip
    projects = json.dumps({"projects": [{"name": "hello"}, {"name": "World"}]}).encode()
    assert parse_projects_page(projects, kind) == ["hello", "World"]
    assert parse_projects_page(b'<a href="/simple/hello/">hello</a>', "text/html") == ["hello"]


def test_newest_picks_pure_wheels_in_range_skipping_yanked_unless_pinned() -> None:
    def wheel(version: str, *, tag: str = "py3-none-any", yanked: bool = False) -> IndexFile:
        return IndexFile(f"hello-{version}-{tag}.whl", "u", SHA, yanked=yanked)

    files = [
        wheel("0.1.0"),
        wheel("0.2.0"),
        wheel("0.3.0", yanked=True),
        wheel("0.4.0", tag="cp311-cp311-manylinux_2_17_x86_64"),
        IndexFile("hello-0.5.0.tar.gz", "u", SHA),
    ]
    assert [str(v) for v, _ in newest(files, SpecifierSet())] == ["0.2.0", "0.1.0"]
    assert [str(v) for v, _ in newest(files, SpecifierSet("==0.3.0"))] == ["0.3.0"]
    assert newest(files, SpecifierSet(), above=Version("0.2.0")) == []


def _wheel(path: Path, members: dict[str, bytes], *, link: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        if link is not None:
            info = zipfile.ZipInfo(link)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, "/etc/passwd")
    return path


@pytest.mark.parametrize("member", ["../evil.py", "/abs/evil.py", "a/../../evil.py"])
def test_unpacking_refuses_members_leaving_the_folder(tmp_path: Path, member: str) -> None:
    wheel = _wheel(tmp_path / "bad-1.0-py3-none-any.whl", {"ok.py": b"", member: b"x"})
    with pytest.raises(PluginError, match="unsafe wheel"):
        unpack_wheel(wheel, tmp_path / "out")
    assert not (tmp_path / "evil.py").exists()
    assert not (tmp_path / "out" / "ok.py").exists()  # checked before anything is written


def test_unpacking_refuses_symlinks(tmp_path: Path) -> None:
    wheel = _wheel(tmp_path / "bad-1.0-py3-none-any.whl", {"ok.py": b""}, link="pkg/link")
    with pytest.raises(PluginError, match="link"):
        unpack_wheel(wheel, tmp_path / "out")


def test_the_plugin_folder_of_a_wheel_and_its_keywords(tmp_path: Path) -> None:
    manifest = {"name": "hello", "version": "0.1.0", "type": "observer", "module": "cul8er_hello"}
    metadata = b"Metadata-Version: 2.1\nName: cul8er-hello\nVersion: 0.1.0\nKeywords: audit,logs\n"
    wheel = _wheel(
        tmp_path / "cul8er_hello-0.1.0-py3-none-any.whl",
        {
            "cul8er_hello/__init__.py": b"",
            "cul8er_hello/cul8er-plugin.json": json.dumps(manifest).encode(),
            "cul8er_hello/cul8er-plugin.sig": b"c2ln\n",
            "cul8er_hello-0.1.0.dist-info/METADATA": metadata,
        },
    )
    plugin = read_wheel_plugin(unpack_wheel(wheel, tmp_path / "out"))
    assert plugin is not None
    assert plugin.root == tmp_path / "out" / "cul8er_hello"
    assert plugin.manifest.name == "hello" and plugin.signature == "c2ln"
    assert plugin.keywords == ("audit", "logs")
    assert plugin.signed([]) is False  # a signature no trusted key verifies


def test_a_wheel_without_a_manifest_holds_no_plugin(tmp_path: Path) -> None:
    wheel = _wheel(tmp_path / "plain-1.0-py3-none-any.whl", {"plain/__init__.py": b""})
    assert read_wheel_plugin(unpack_wheel(wheel, tmp_path / "out")) is None
