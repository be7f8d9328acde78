"""Plugin sources end to end: a git repository, a real package index (pypiserver), checksums.

Plugins are written by ``cul8er plugin init``, built into wheels by ``pip wheel`` and served
by ``pypi-server`` on loopback; the real ``cul8er`` CLI installs, searches and updates them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tarfile
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.test_plugins import cli, free_port
from tests.stack import Stack
from workers.pluginhost.trust import MANIFEST_FILE, SIGNATURE_FILE, generate_keypair, sign_manifest
from workers.runtime.models import Plugin
from workers.runtime.waiting import wait_until

pytestmark = pytest.mark.integration

#: The plugin every test installs: ``cul8er plugin init demo`` names its project cul8er-demo.
NAME = "demo"
MODULE = "cul8er_demo"


@dataclass
class Authored:
    """The wheels built once for the module, and the key that signed some of them."""

    wheels: dict[str, Path]
    public_key: str
    package: Path


def _set_version(author: Stack, project: Path, version: str, *, api: str | None = None) -> None:
    """Bump the package to ``version`` (pyproject and manifest), rehashed as an author does."""
    pyproject = project / "pyproject.toml"
    text = re.sub(r'(?m)^version = ".*"$', f'version = "{version}"', pyproject.read_text())
    pyproject.write_text(text)
    manifest_path = project / MODULE / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    manifest["version"] = version
    if api is not None:
        manifest["api"] = api
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    cli(author, "plugin", "rehash", str(project / MODULE))


def _sign(project: Path, private_key: bytes | None) -> None:
    """Sign the manifest as it is now (``None``: leave it unsigned)."""
    signature = project / MODULE / SIGNATURE_FILE
    signature.unlink(missing_ok=True)
    if private_key is not None:
        raw = (project / MODULE / MANIFEST_FILE).read_bytes()
        signature.write_text(base64.b64encode(sign_manifest(raw, private_key)).decode())


def _wheel(project: Path, out: Path) -> Path:
    # setuptools keeps build/ between builds: a file removed since (a signature) would stay.
    shutil.rmtree(project / "build", ignore_errors=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "-w",
            str(out),
            str(project),
        ],
        check=True,
        timeout=300,
    )
    return max(out.glob("*.whl"), key=lambda p: p.stat().st_mtime)


@pytest.fixture(scope="module")
def authored(tmp_path_factory: pytest.TempPathFactory) -> Authored:
    """demo 0.1.0 (signed), 0.2.0 (unsigned) and 0.3.0 (needs plugin API 2), as wheels."""
    folder = tmp_path_factory.mktemp("author")
    author = Stack("author", folder / "data", f"sqlite:///{folder / 'author.db'}", None)
    cli(author, "plugin", "init", NAME, "--trusted", "--directory", str(folder))
    project = folder / "cul8er-demo"
    pyproject = project / "pyproject.toml"
    text = pyproject.read_text().replace(
        'requires-python = ">=3.11"', 'requires-python = ">=3.11"\nkeywords = ["telemetry"]'
    )
    text = text.replace(f'["{MANIFEST_FILE}"]', f'["{MANIFEST_FILE}", "{SIGNATURE_FILE}"]')
    pyproject.write_text(text)
    private, public = generate_keypair()
    wheels = {}
    for version, key, api in (("0.1.0", private, None), ("0.2.0", None, None)):
        _set_version(author, project, version, api=api)
        _sign(project, key)
        wheels[version] = _wheel(project, folder / f"wheels-{version}")
    _set_version(author, project, "0.3.0", api=">=2,<3")
    wheels["0.3.0"] = _wheel(project, folder / "wheels-0.3.0")
    _set_version(author, project, "0.1.0", api=">=1,<2")
    return Authored(wheels, base64.b64encode(public).decode(), project)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False


@dataclass
class Index:
    """A package index on loopback, serving the wheels put in ``folder``."""

    folder: Path
    url: str

    def publish(self, wheel: Path, data: bytes | None = None) -> None:
        (self.folder / wheel.name).write_bytes(data if data is not None else wheel.read_bytes())


def _serve(args: list[str], url: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    wait_until(lambda: _answers(url), timeout=30, interval=0.1, message=f"{url} never answered")
    return process


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[[list[str], str], None]]:
    """``serve(args, url)`` starts a server process and waits for ``url``; stopped after."""
    started: list[subprocess.Popen[bytes]] = []

    def start(args: list[str], url: str) -> None:
        started.append(_serve(args, url, tmp_path / f"server-{len(started)}.log"))

    yield start
    for process in started:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def index(tmp_path: Path, serve: Callable[[list[str], str], None]) -> Index:
    """pypi-server 2.x, without authentication and never falling back to a public index."""
    folder = tmp_path / "index"
    folder.mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}/simple/"
    command = [sys.executable, "-m", "pypiserver", "run", "-i", "127.0.0.1", "-p", str(port)]
    command += ["-a", ".", "-P", ".", "--disable-fallback", "--backend", "simple-dir", str(folder)]
    serve(command, url)
    return Index(folder, url)


@pytest.fixture
def stack(
    stack_factory: Callable[..., Stack], index: Index, authored: Authored, tmp_path: Path
) -> Stack:
    made = stack_factory("embedded")
    made.extra_env.update(
        CUL8ER_PLUGIN_REGISTRIES=index.url,
        CUL8ER_PLUGIN_TRUSTED_KEYS=json.dumps([authored.public_key]),
        CUL8ER_PLUGIN_PATH=str(tmp_path / "plugin-path"),
    )
    (tmp_path / "plugin-path").mkdir()
    return made


def row(stack: Stack, name: str = NAME) -> Plugin:
    with stack.session() as session:
        found = session.get(Plugin, name)
        assert found is not None, f"no plugins row for {name}"
        session.expunge(found)
        return found


def serving(stack: Stack, name: str = NAME) -> tuple[str, str]:
    listed = {p["name"]: p for p in json.loads(cli(stack, "plugin", "list", "--json").stdout)}
    return listed[name]["version"], listed[name]["state"]


def installed(stack: Stack) -> list[str]:
    return sorted(p.name for p in (stack.data_dir / "plugins").iterdir() if p.name[0] != ".")


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", *args],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def test_install_from_git_at_a_tag_and_at_a_commit(stack: Stack, tmp_path: Path) -> None:
    # Given a git repository holding a plugin package: 0.1.0 tagged, then 0.2.0 committed
    cli(stack, "plugin", "init", "gitdemo", "--trusted", "--directory", str(tmp_path))
    repo = tmp_path / "cul8er-gitdemo"
    _git(repo, "init", "--quiet", "--initial-branch", "main")
    _git(repo, "add", ".")
    _git(repo, "commit", "--quiet", "-m", "0.1.0")
    _git(repo, "tag", "v0.1.0")
    tagged = _git(repo, "rev-parse", "HEAD")
    manifest_path = repo / "cul8er_gitdemo" / MANIFEST_FILE
    manifest_path.write_text(manifest_path.read_text().replace('"0.1.0"', '"0.2.0"'))
    _git(repo, "commit", "--quiet", "-am", "0.2.0")
    latest = _git(repo, "rev-parse", "HEAD")

    # When it is installed at the tag (a local path)
    answer = json.loads(cli(stack, "plugin", "install", f"git+{repo}@v0.1.0", "--json").stdout)
    # Then the tag's commit is recorded as its source, and it serves
    assert answer["version"] == "0.1.0" and answer["commit"] == tagged
    assert row(stack, "gitdemo").source == f"git:{repo}@{tagged}"
    assert row(stack, "gitdemo").state == "active"

    # When it is installed at a commit (a file:// URL)
    answer = json.loads(
        cli(stack, "plugin", "install", f"git+file://{repo}@{latest[:10]}", "--json").stdout
    )
    # Then that commit's version serves, its full sha recorded
    assert answer["version"] == "0.2.0" and answer["commit"] == latest
    assert row(stack, "gitdemo").source == f"git:file://{repo}@{latest}"
    assert row(stack, "gitdemo").version == "0.2.0"
    # And a later boot of a registry (any cul8er command) keeps that source on the row
    cli(stack, "plugin", "list", "--json")
    assert row(stack, "gitdemo").source == f"git:file://{repo}@{latest}"

    # And a ref that does not exist is refused with git's reason
    missing = cli(stack, "plugin", "install", f"git+{repo}@no-such-ref", check=False)
    assert missing.returncode == 1 and "git" in missing.stderr


def test_install_from_the_registry_by_name_and_pinned_version(
    stack: Stack, index: Index, authored: Authored
) -> None:
    # Given 0.1.0 and 0.2.0 on the index
    index.publish(authored.wheels["0.1.0"])
    index.publish(authored.wheels["0.2.0"])

    # When NAME==0.1.0 is installed
    answer = json.loads(cli(stack, "plugin", "install", f"{NAME}==0.1.0", "--json").stdout)
    # Then 0.1.0 serves, its wheel recorded as the source
    assert answer["version"] == "0.1.0" and answer["state"] == "active"
    assert row(stack).source.startswith("registry:http://127.0.0.1:")
    assert row(stack).source.endswith("cul8er_demo-0.1.0-py3-none-any.whl")

    # When NAME is installed: the newest version, reloaded onto it
    answer = json.loads(cli(stack, "plugin", "install", NAME, "--json").stdout)
    assert answer["version"] == "0.2.0" and answer["previous"] == "0.1.0"
    assert serving(stack) == ("0.2.0", "active")

    # And a version the index does not have is refused, naming the index
    missing = cli(stack, "plugin", "install", f"{NAME}==9.9.9", check=False)
    assert missing.returncode == 1 and index.url in missing.stderr


def _plain_wheel(folder: Path) -> Path:
    """A wheel that is no cul8er plugin, though its keywords match the search."""
    path = folder / "telemetry_tools-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("telemetry_tools/__init__.py", "")
        wheel.writestr(
            "telemetry_tools-1.0.dist-info/METADATA",
            "Metadata-Version: 2.1\nName: telemetry-tools\nVersion: 1.0\nKeywords: telemetry\n",
        )
    return path


def test_search_finds_plugins_by_name_and_keyword(
    stack: Stack, index: Index, authored: Authored, tmp_path: Path
) -> None:
    # Given a signed plugin and a package that is no plugin on the index
    index.publish(authored.wheels["0.1.0"])
    index.publish(_plain_wheel(tmp_path))

    # When searched by name, and by a keyword of its wheel's metadata
    by_name = json.loads(cli(stack, "plugin", "search", "dem", "--json").stdout)
    by_keyword = json.loads(cli(stack, "plugin", "search", "TELEMETRY", "--json").stdout)

    # Then the plugin is found both ways, with its type, description and signature
    for found in (by_name, by_keyword):
        assert [item["name"] for item in found] == [NAME]
        assert found[0]["version"] == "0.1.0" and found[0]["type"] == "observer"
        assert found[0]["signed"] is True
        assert found[0]["description"] == "The demo observer plugin."
    # And nothing else matches
    assert json.loads(cli(stack, "plugin", "search", "nothing-like-it", "--json").stdout) == []


def test_an_update_installs_the_newest_fitting_version_beside_the_serving_one(
    stack: Stack, index: Index, authored: Authored
) -> None:
    # Given 0.1.0 installed from the index, then 0.2.0 and 0.3.0 (plugin API 2) published
    index.publish(authored.wheels["0.1.0"])
    cli(stack, "plugin", "install", NAME)
    index.publish(authored.wheels["0.2.0"])
    index.publish(authored.wheels["0.3.0"])

    # When it is updated
    answer = json.loads(cli(stack, "plugin", "update", NAME, "--json").stdout)

    # Then 0.2.0 (0.3.0 needs another plugin API) is installed beside 0.1.0
    assert answer["ok"] is True and answer["version"] == "0.2.0"
    assert answer["serving"] == "0.1.0" and answer["switched"] is False
    assert installed(stack) == ["demo-0.1.0.zip", "demo-0.2.0.zip"]
    # And the fleet still runs 0.1.0
    assert serving(stack) == ("0.1.0", "active")
    assert row(stack).version == "0.1.0"


def test_an_update_whose_wheel_does_not_match_the_index_hash_is_refused(
    stack: Stack, index: Index, authored: Authored, tmp_path: Path, serve: Callable[..., None]
) -> None:
    # Given 0.1.0 installed, and an index whose 0.2.0 wheel was altered after publication
    index.publish(authored.wheels["0.1.0"])
    cli(stack, "plugin", "install", NAME)
    wheel = authored.wheels["0.2.0"]
    genuine = hashlib.sha256(wheel.read_bytes()).hexdigest()
    static = tmp_path / "static"
    (static / "simple" / "cul8er-demo").mkdir(parents=True)
    (static / "packages").mkdir()
    (static / "packages" / wheel.name).write_bytes(wheel.read_bytes() + b"tampered")
    link = f'<a href="../../packages/{wheel.name}#sha256={genuine}">{wheel.name}</a>'
    (static / "simple" / "cul8er-demo" / "index.html").write_text(f"<html><body>{link}</body>")
    port = free_port()
    url = f"http://127.0.0.1:{port}/simple/"
    serve(
        [sys.executable, "-m", "http.server", str(port), "-b", "127.0.0.1", "-d", str(static)], url
    )
    stack.extra_env["CUL8ER_PLUGIN_REGISTRIES"] = f"{url},{index.url}"

    # When it is updated
    refused = cli(stack, "plugin", "update", NAME, "--json", check=False)

    # Then the update is refused naming both digests, and 0.1.0 keeps serving
    assert refused.returncode == 1
    answer = json.loads(refused.stdout)
    assert answer["ok"] is False and genuine in answer["error"]
    tampered = hashlib.sha256(wheel.read_bytes() + b"tampered").hexdigest()
    assert tampered in answer["error"]
    assert installed(stack) == ["demo-0.1.0.zip"]
    assert serving(stack) == ("0.1.0", "active")


def test_an_unsigned_update_is_refused_when_signatures_are_required(
    stack: Stack, index: Index, authored: Authored
) -> None:
    # Given signed 0.1.0 serving under CUL8ER_REQUIRE_SIGNED_PLUGINS, and unsigned 0.2.0
    stack.extra_env["CUL8ER_REQUIRE_SIGNED_PLUGINS"] = "true"
    index.publish(authored.wheels["0.1.0"])
    cli(stack, "plugin", "install", NAME)
    index.publish(authored.wheels["0.2.0"])

    # When it is updated
    refused = cli(stack, "plugin", "update", NAME, "--json", check=False)

    # Then it is refused as unsigned, and 0.1.0 keeps serving
    assert refused.returncode == 1
    answer = json.loads(refused.stdout)
    assert "unsigned" in answer["error"] and answer["serving"] == "0.1.0"
    assert installed(stack) == ["demo-0.1.0.zip"]
    assert serving(stack) == ("0.1.0", "active")


def test_sha256_of_an_archive_is_checked_before_it_is_opened(
    stack: Stack, authored: Authored, tmp_path: Path
) -> None:
    # Given the plugin packed as a .tar.gz
    archive = tmp_path / "demo-0.1.0.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(authored.package / MODULE, arcname=MODULE)
    actual = hashlib.sha256(archive.read_bytes()).hexdigest()
    wrong = "0" * 64

    # When it is installed with another sha256
    refused = cli(stack, "plugin", "install", str(archive), "--sha256", wrong, check=False)
    # Then it is refused naming both digests, and nothing is installed
    assert refused.returncode == 1
    assert actual in refused.stderr and wrong in refused.stderr
    assert not (stack.data_dir / "plugins").exists() or installed(stack) == []

    # And with its own sha256 it installs
    answer = json.loads(
        cli(stack, "plugin", "install", str(archive), "--sha256", actual, "--json").stdout
    )
    assert answer["version"] == "0.1.0" and answer["state"] == "active"
