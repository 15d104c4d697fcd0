"""Debian system packages without the network: versions, relations, resolution, the lock, the layer."""

from __future__ import annotations

import hashlib
import io
import lzma
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from orchestrator.debian import aptlock

from orchestrator.debian import archive

from orchestrator.debian import packages as debpackages

from orchestrator.debian import resolve as resolver

from orchestrator.debian import versions as debversions
from orchestrator.debian import layer as apt_layer
from orchestrator.oci import layers
from orchestrator.common.errors import EnvironmentProblem, UserError

from ..conftest import unavailable

# --- versions -----------------------------------------------------------------

ORDERED = ["1.0~rc1", "1.0", "1.0-1", "1.0-1+b1", "1.0-1+deb12u1", "1.0a", "1.0.1", "1.1~", "1.1", "1:0.9",
           "2:0.1~beta"]


def test_debian_versions_sort_as_dpkg_sorts_them():
    for i, a in enumerate(ORDERED):
        for j, b in enumerate(ORDERED):
            assert debversions.compare_versions(a, b) == (i > j) - (i < j), (a, b)
    assert debversions.compare_versions("1.0", "1.00") == 0  # leading zeros of a number do not count
    assert debversions.compare_versions("1.0", "1.0-0") == 0  # no revision is revision 0
    assert debversions.compare_versions("7:5.1.9-0+deb12u1", "7:5.1") == 1
    assert debversions.compare_versions("2.36-9+deb12u14", "2.36-9+deb12u9") == 1


def test_versions_agree_with_dpkg_compare_versions():
    if not shutil.which("dpkg"):
        unavailable("dpkg is not installed")
    pairs = [("1.2.3-1", "1.2.3-1~bpo1"), ("0.8+5prealpha+1-15", "0.8+5prealpha-1"), ("1.0+dfsg", "1.0.1"),
             ("3.11.2-1+b1", "3.11.2-1"), ("1:2.38.1-5+deb12u3", "2.38.1-5+deb12u3"), ("a", "A"), ("1.0-a", "1.0-+")]
    for a, b in pairs:
        lt = subprocess.run(["dpkg", "--compare-versions", a, "lt", b]).returncode == 0
        eq = subprocess.run(["dpkg", "--compare-versions", a, "eq", b]).returncode == 0
        assert debversions.compare_versions(a, b) == (0 if eq else -1 if lt else 1), (a, b)


def test_relations_parse_alternatives_versions_and_qualifiers():
    rels = debpackages.parse_relations("libc6 (>= 2.34), perl:any, debconf (>= 0.5) | debconf-2.0, old (> 1), x [amd64]")
    assert rels == (
        (debpackages.Relation("libc6", ">=", "2.34"),),
        (debpackages.Relation("perl"),),
        (debpackages.Relation("debconf", ">=", "0.5"), debpackages.Relation("debconf-2.0")),
        (debpackages.Relation("old", ">=", "1"),),  # the obsolete `>` means >=
        (debpackages.Relation("x"),),
    )


# --- resolution -----------------------------------------------------------------

MAIN = """\
Package: app
Version: 1.0-1
Architecture: amd64
Depends: libfoo (>= 1.2), libmissing | libbar, mail-transport-agent, libc6 (>= 2.30), perl:any
Pre-Depends: prep
Filename: pool/main/a/app/app_1.0-1_amd64.deb
Size: 100
SHA256: {h}
Description: the app
 with a long description

Package: libfoo
Version: 1.1-1
Architecture: amd64
Filename: pool/main/libf/libfoo/libfoo_1.1-1_amd64.deb
Size: 10
SHA256: {h}

Package: libfoo
Version: 1.3-1
Architecture: amd64
Depends: libfoo-data (= 1.3-1)
Filename: pool/main/libf/libfoo/libfoo_1.3-1_amd64.deb
Size: 11
SHA256: {h}

Package: libfoo-data
Version: 1.3-1
Architecture: all
Filename: pool/main/libf/libfoo/libfoo-data_1.3-1_all.deb
Size: 12
SHA256: {h}

Package: libbar
Version: 2.0
Architecture: amd64
Filename: pool/main/libb/libbar/libbar_2.0_amd64.deb
Size: 13
SHA256: {h}

Package: exim
Version: 4.0
Architecture: amd64
Priority: standard
Provides: mail-transport-agent
Filename: pool/main/e/exim/exim_4.0_amd64.deb
Size: 14
SHA256: {h}

Package: postfix
Version: 3.0
Architecture: amd64
Priority: optional
Provides: mail-transport-agent
Filename: pool/main/p/postfix/postfix_3.0_amd64.deb
Size: 15
SHA256: {h}

Package: prep
Version: 1
Architecture: all
Filename: pool/main/p/prep/prep_1_all.deb
Size: 16
SHA256: {h}

Package: libc6
Version: 2.36-9+deb12u1
Architecture: amd64
Provides: libc-dev-bin-stub (= 2.36)
Filename: pool/main/g/glibc/libc6_2.36-9+deb12u1_amd64.deb
Size: 17
SHA256: {h}

Package: perl
Version: 5.36.0-7
Architecture: amd64
Filename: pool/main/p/perl/perl_5.36.0-7_amd64.deb
Size: 18
SHA256: {h}

Package: needs-new-libc
Version: 1
Architecture: amd64
Depends: libc6 (>= 2.36-9+deb12u3)
Filename: pool/main/n/nnl/needs-new-libc_1_amd64.deb
Size: 19
SHA256: {h}

Package: needs-stub
Version: 1
Architecture: amd64
Depends: libc-dev-bin-stub (>= 2.30)
Filename: pool/main/n/ns/needs-stub_1_amd64.deb
Size: 20
SHA256: {h}

Package: broken
Version: 1
Architecture: amd64
Depends: middle
Filename: pool/main/b/broken/broken_1_amd64.deb
Size: 21
SHA256: {h}

Package: middle
Version: 1
Architecture: amd64
Depends: libfoo (>= 9) | libgone
Filename: pool/main/m/middle/middle_1_amd64.deb
Size: 22
SHA256: {h}
""".format(h="a" * 64)

SECURITY = """\
Package: libc6
Version: 2.36-9+deb12u4
Architecture: amd64
Provides: libc-dev-bin-stub (= 2.36)
Filename: pool/updates/main/g/glibc/libc6_2.36-9+deb12u4_amd64.deb
Size: 30
SHA256: {h}
""".format(h="b" * 64)

BASE = {"libc6": "2.36-9+deb12u1", "perl": "5.36.0-7"}
MIRROR = "http://deb.example/debian"
SEC = "http://deb.example/debian-security"


def index() -> debpackages.Index:
    return debpackages.Index(debpackages.parse_packages(MAIN, MIRROR) + debpackages.parse_packages(SECURITY, SEC))


def resolve(reqs, installed=BASE):
    return resolver.resolve(index(), reqs, installed, suite="bookworm", platform="linux/amd64")


def test_the_closure_takes_the_newest_satisfying_version_the_first_satisfiable_alternative_and_a_provider():
    res = resolve(["app"])
    got = {p.name: p.version for p in res.pins}
    assert got == {"app": "1.0-1", "libfoo": "1.3-1", "libfoo-data": "1.3-1", "libbar": "2.0", "exim": "4.0",
                   "prep": "1"}  # libmissing is skipped, exim has the higher Priority, libc6/perl are in the base
    assert [p.name for p in res.pins] == sorted(got)
    app = res.pins[0]
    assert app.url == f"{MIRROR}/pool/main/a/app/app_1.0-1_amd64.deb" and app.size == 100 and app.sha256 == "a" * 64
    assert dict(res.why)["libfoo-data"] == "app -> libfoo -> libfoo-data"


def test_an_alternative_already_installed_wins_over_the_first_one():
    res = resolve(["middle"], {**BASE, "libgone": "1"})
    assert [p.name for p in res.pins] == ["middle"]


def test_a_provider_in_the_base_satisfies_a_virtual_dependency_with_a_versioned_provides():
    assert [p.name for p in resolve(["needs-stub"]).pins] == ["needs-stub"]


def test_a_base_package_too_old_for_a_dependency_is_upgraded_from_the_security_archive_with_a_note():
    res = resolve(["needs-new-libc"])
    libc = next(p for p in res.pins if p.name == "libc6")
    assert libc.version == "2.36-9+deb12u4" and libc.url.startswith(SEC + "/pool/updates/")
    assert any("libc6 2.36-9+deb12u4 replaces the base's 2.36-9+deb12u1" in n for n in res.notes)


def test_requests_already_in_the_base_add_nothing():
    res = resolve(["perl"])
    assert res.pins == () and res.notes == ("perl is already in the base image (5.36.0-7)",)


def test_an_exact_version_can_be_requested():
    assert {p.name: p.version for p in resolve(["libfoo=1.1-1"]).pins} == {"libfoo": "1.1-1"}


def test_versions_of_the_previous_lock_are_kept_where_they_still_satisfy():
    prefer = {"libfoo": "1.1-1", "libc6": "2.36-9+deb12u1", "libbar": "1.0"}  # libbar 1.0 is gone
    got = {p.name: p.version for p in resolver.resolve(index(), ["libfoo", "needs-new-libc", "libbar"], BASE,
                                                  suite="bookworm", platform="linux/amd64", prefer=prefer).pins}
    assert got == {"libfoo": "1.1-1", "libc6": "2.36-9+deb12u4", "libbar": "2.0", "needs-new-libc": "1"}


def test_an_unknown_package_names_the_package_the_suite_and_the_platform():
    with pytest.raises(UserError) as e:
        resolver.resolve(index(), ["ffmpge"], BASE, suite="bookworm", platform="linux/arm64")
    msg = str(e.value)
    assert "'ffmpge'" in msg and "bookworm" in msg and "linux/arm64" in msg
    assert "packages.debian.org/bookworm/ffmpge" in e.value.hint


def test_an_unavailable_version_lists_the_offered_ones():
    with pytest.raises(UserError, match=r"libfoo 7 is not available in Debian bookworm for linux/amd64 "
                                        r"\(offered: 1.3-1, 1.1-1\)"):
        resolve(["libfoo=7"])


def test_an_unsatisfiable_dependency_names_the_chain():
    with pytest.raises(UserError) as e:
        resolve(["broken"])
    msg = str(e.value)
    assert "middle 1 needs libfoo (>= 9) | libgone" in msg and "pulled in by broken -> middle" in msg
    assert "offers 1.3-1, 1.1-1" in msg and "libgone: not in the archive" in msg


def test_a_virtual_request_with_several_providers_asks_for_one():
    with pytest.raises(UserError, match="exim, postfix provide it"):
        resolve(["mail-transport-agent"])


def test_a_malformed_request_is_refused():
    with pytest.raises(UserError, match="not a Debian package name"):
        resolve(["FFmpeg; rm -rf /"])


def test_the_resolution_does_not_depend_on_the_order_of_requests_or_stanzas():
    a = resolve(["app", "needs-new-libc"])
    b = resolver.resolve(debpackages.Index(list(reversed(debpackages.parse_packages(SECURITY, SEC) + debpackages.parse_packages(MAIN, MIRROR)))),
                    ["needs-new-libc", "app"], BASE, suite="bookworm", platform="linux/amd64")
    assert a.pins == b.pins


def test_an_unsupported_platform_is_a_user_error():
    with pytest.raises(UserError, match="linux/s390x"):
        archive.debian_arch("linux/s390x")


# --- the lock ---------------------------------------------------------------------

SOURCES = archive.default_sources("bookworm", MIRROR, SEC)


def make_lock(reqs=("app",)) -> aptlock.AptLock:
    res = resolve(list(reqs))
    snaps = tuple(archive.Snapshot(s, "Sat, 11 Jul 2026 10:16:37 UTC", "c" * 64, "gpgv ABC") for s in SOURCES)
    return aptlock.AptLock("bookworm", "linux/amd64", aptlock.apt_inputs_hash(reqs, SOURCES, "linux/amd64", BASE),
                       tuple(reqs), snaps, res.pins)


def test_the_lock_is_one_sorted_line_per_package_under_a_header_and_round_trips(tmp_path):
    lk = make_lock()
    text = lk.text()
    assert text.startswith("# orchestrator apt lock v1: suite=bookworm platform=linux/amd64\n# inputs-sha256: ")
    assert f"# source: {MIRROR} bookworm-updates main date='Sat, 11 Jul 2026 10:16:37 UTC'" in text
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    names = [line.split("=", 1)[0] for line in lines]
    assert names == sorted(names) and len(lines) == 6
    assert lines[0] == f"app=1.0-1 amd64 {'a' * 64} 100 {MIRROR}/pool/main/a/app/app_1.0-1_amd64.deb"
    path = aptlock.lock_path(tmp_path, "linux/amd64")
    assert path == tmp_path / "locks" / "apt-amd64" / "system.txt"
    aptlock.write_apt_lock(path, lk)
    assert aptlock.read_apt_lock(path) == lk


def test_a_lock_edited_by_hand_reads_as_missing():
    text = make_lock().text()
    assert aptlock.parse_apt_lock(text.replace("libbar=2.0", "libbar=2.1")) is None
    assert aptlock.parse_apt_lock(text.replace("2026 10:16", "2026 10:17")) is None  # the snapshot is covered too
    assert aptlock.parse_apt_lock("garbage") is None


def test_staleness_is_decided_from_the_header_alone():
    lk = make_lock()
    assert aptlock.stale_reason(lk, ["app"], SOURCES, "linux/amd64", BASE) is None
    assert aptlock.stale_reason(lk, ["app", "perl"], SOURCES, "linux/amd64", BASE) == "requests changed: +perl"
    assert aptlock.stale_reason(lk, ["app"], SOURCES[:1], "linux/amd64", BASE) == "sources changed"
    assert aptlock.stale_reason(lk, ["app"], SOURCES, "linux/amd64", {**BASE, "perl": "5.36.0-8"}) == \
        "the base image's packages changed"
    assert aptlock.stale_reason(lk, ["app"], SOURCES, "linux/arm64", BASE) == "locked for linux/amd64, not linux/arm64"
    assert aptlock.stale_reason(None, ["app"], SOURCES, "linux/amd64", BASE) == "missing or edited by hand"


def test_base_json_packages_become_a_mapping():
    assert aptlock.installed_from_base(["libc6=2.36-9+deb12u14", "bsdutils=1:2.38.1-5+deb12u3"]) == {
        "libc6": "2.36-9+deb12u14", "bsdutils": "1:2.38.1-5+deb12u3"}


# --- index fetching pieces ----------------------------------------------------------

RELEASE = """\
-----BEGIN PGP SIGNED MESSAGE-----
Hash: SHA256

Origin: Debian
Codename: bookworm
Date: Sat, 11 Jul 2026 10:16:37 UTC
SHA256:
 %s 123 main/binary-amd64/Packages
 %s 45 main/binary-amd64/Packages.xz
- -dash-escaped: yes
-----BEGIN PGP SIGNATURE-----

abc
-----END PGP SIGNATURE-----
""" % ("1" * 64, "2" * 64)


def test_a_release_file_gives_the_hashes_of_the_indexes():
    rel = archive.parse_release(archive._clearsigned_body(RELEASE))
    assert rel.fields["Codename"] == "bookworm" and rel.fields["-dash-escaped"] == "yes"
    assert archive._packages_entry(rel, "main", "amd64") == ("main/binary-amd64/Packages.xz", "2" * 64, 45)
    assert archive._packages_entry(rel, "main", "arm64") == ("", "", 0)


def test_without_a_keyring_the_release_is_read_and_marked_unverified(tmp_path):
    text, sig = archive.verify_inrelease(RELEASE.encode(), str(tmp_path / "none.gpg"), "http://x/InRelease")
    assert sig.startswith("not verified: ") and "Codename: bookworm" in text


def test_a_forged_inrelease_is_refused():
    if not (shutil.which("gpgv") and Path(archive.DEFAULT_KEYRING).is_file()):
        unavailable("gpgv or debian-archive-keyring is not installed (ci/setup.sh installs both)")
    with pytest.raises(EnvironmentProblem, match="signature does not verify"):
        archive.verify_inrelease(RELEASE.encode(), archive.DEFAULT_KEYRING, "http://x/InRelease")


class FakeResponse:
    def __init__(self, status: int, content: bytes = b""):
        self.status_code, self.content = status, content


class FakeSession:
    def __init__(self, files: dict[str, bytes]):
        self.files, self.calls = files, []

    def get(self, url, timeout=None):
        self.calls.append(url)
        return FakeResponse(200, self.files[url]) if url in self.files else FakeResponse(404)


# --- the layer ----------------------------------------------------------------------

def _tar(entries, compress: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name, kind, payload in entries:
            info = tarfile.TarInfo(name)
            info.mtime, info.uname, info.gname = 1700000000, "root", "root"
            if kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(info)
            elif kind == "sym":
                info.type, info.linkname = tarfile.SYMTYPE, payload
                tf.addfile(info)
            elif kind == "hard":
                info.type, info.linkname = tarfile.LNKTYPE, payload
                tf.addfile(info)
            else:
                info.size, info.mode = len(payload), 0o755 if kind == "exe" else 0o644
                tf.addfile(info, io.BytesIO(payload))
    raw = buf.getvalue()
    return lzma.compress(raw) if compress == "xz" else __import__("gzip").compress(raw, mtime=0)


def make_deb(path: Path, name: str, version: str, entries, control_extra: dict[str, str] | None = None) -> Path:
    control = f"Package: {name}\nVersion: {version}\nArchitecture: amd64\nMaintainer: t <t@example>\n" \
              f"Description: test\n"
    files = [("./", "dir", None), ("./control", "file", control.encode()),
             ("./md5sums", "file", b"d41d8cd98f00b204e9800998ecf8427e  usr/bin/x\n")]
    files += [(f"./{k}", "exe", v.encode()) for k, v in (control_extra or {}).items()]
    members = [("debian-binary", b"2.0\n"), ("control.tar.gz", _tar(files, "gz")), ("data.tar.xz", _tar(entries, "xz"))]
    out = io.BytesIO()
    out.write(b"!<arch>\n")
    for mname, data in members:
        out.write(f"{mname:<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n".encode())
        out.write(data + (b"\n" if len(data) % 2 else b""))
    path.write_bytes(out.getvalue())
    return path


POSTINST = """#!/bin/sh
set -e
update-alternatives --install /usr/lib/x86_64-linux-gnu/libblas.so.3 \\
                    libblas.so.3-x86_64-linux-gnu /usr/lib/x86_64-linux-gnu/blas/libblas.so.3 10
exit 0
"""


@pytest.fixture
def debs(tmp_path):
    d = tmp_path / "debs"
    d.mkdir()
    a = make_deb(d / "a.deb", "liba", "1.0", [
        ("./", "dir", None), ("./lib", "dir", None), ("./lib/x86_64-linux-gnu", "dir", None),
        ("./lib/x86_64-linux-gnu/liba.so.1", "file", b"liba"),
        ("./usr", "dir", None), ("./usr/bin", "dir", None), ("./usr/bin/a", "exe", b"#!/bin/sh\necho a\n"),
        ("./usr/bin/0a", "hard", "./usr/bin/a"),  # sorts before its target
        ("./usr/lib/x86_64-linux-gnu/blas/libblas.so.3", "file", b"blas"),
        ("./usr/share", "dir", None), ("./usr/share/doc", "dir", None), ("./usr/share/doc/liba", "dir", None),
        ("./usr/share/doc/liba/copyright", "file", b"GPL"), ("./usr/share/doc/liba/changelog.gz", "file", b"x"),
        ("./usr/share/man/man1/a.1.gz", "file", b"man"), ("./usr/share/locale/de/LC_MESSAGES/a.mo", "file", b"de"),
    ], {"postinst": POSTINST})
    b = make_deb(d / "b.deb", "libb", "2.0", [
        ("./", "dir", None), ("./usr", "dir", None), ("./usr/share", "dir", None),
        ("./usr/share/doc", "dir", None), ("./usr/share/doc/libb", "sym", "liba"),
        ("./usr/share/b", "file", b"b data"), ("./bin", "dir", None), ("./bin/b", "sym", "/usr/bin/a"),
    ])
    pins = tuple(resolver.AptPin(n, v, "amd64", hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_size,
                            f"{MIRROR}/pool/main/{p.name}") for n, v, p in (("liba", "1.0", a), ("libb", "2.0", b)))
    lk = aptlock.AptLock("bookworm", "linux/amd64", "0" * 64, ("liba", "libb"), (), pins)
    return lk, {MIRROR + f"/pool/main/{p.name}": p.read_bytes() for p in (a, b)}


def build(lk, files, root: Path):
    dl = archive.Downloader(root / "apt", session=FakeSession(files))
    cache = layers.BlobCache(root / "blobs")
    return apt_layer.build_layer(lk, cache, layers.codec("gzip"), downloader=dl)


def test_a_deb_is_read_without_dpkg(debs, tmp_path):
    lk, files = debs
    path = tmp_path / "a.deb"
    path.write_bytes(files[lk.pins[0].url])
    with apt_layer.Deb(path) as deb:
        assert b"Package: liba" in deb.control["control"] and "postinst" in deb.control
        with deb.data() as tf:
            assert "./usr/bin/a" in [m.name for m in tf]
    if shutil.which("dpkg-deb"):  # the test .deb is a real one
        listing = subprocess.run(["dpkg-deb", "-c", str(path)], capture_output=True, text=True, check=True).stdout
        assert "./usr/bin/a" in listing


def test_the_layer_merges_packages_under_merged_usr_without_docs_and_with_what_scripts_would_link(debs, tmp_path):
    lk, files = debs
    res = build(lk, files, tmp_path / "one")
    with tarfile.open(res.layer.path, "r:gz") as tf:
        members = {m.name: m for m in tf.getmembers()}
        names = list(members)
        assert names == sorted(names, key=lambda n: tuple(n.split("/")))
        assert not {"lib", "bin"} & set(names)  # would replace the base's lib -> usr/lib symlink
        assert "usr/lib/x86_64-linux-gnu/liba.so.1" in names and members["usr/bin/b"].linkname == "/usr/bin/a"
        assert "usr/share/doc/liba/copyright" in names and members["usr/share/doc/libb"].issym()
        assert not [n for n in names if "changelog" in n or "/man/" in n or "/locale/" in n]
        # The hard link's group is led by the name that sorts first.
        assert members["usr/bin/0a"].isreg() and members["usr/bin/a"].islnk()
        assert members["usr/bin/a"].linkname == "usr/bin/0a"
        assert tf.extractfile("usr/bin/0a").read() == b"#!/bin/sh\necho a\n"
        assert members["usr/lib/x86_64-linux-gnu/libblas.so.3"].linkname == \
            "/etc/alternatives/libblas.so.3-x86_64-linux-gnu"
        assert members["etc/alternatives/libblas.so.3-x86_64-linux-gnu"].linkname == \
            "/usr/lib/x86_64-linux-gnu/blas/libblas.so.3"
        assert tf.extractfile("var/lib/dpkg/status.d/liba").read().startswith(b"Package: liba\n")
        assert "var/lib/dpkg/status.d/libb.md5sums" in names
        assert {m.mtime for m in members.values()} == {layers.SOURCE_DATE_EPOCH}
        assert {(m.uname, m.gname) for m in members.values()} == {("", "")}
    frag = res.fragment
    assert frag.maintainer_scripts_that_matter() == {
        "liba": ["alternative /usr/lib/x86_64-linux-gnu/libblas.so.3 -> /usr/lib/x86_64-linux-gnu/blas/libblas.so.3"]}


def test_the_same_lock_gives_the_same_digest_from_cold_caches_and_the_layer_cache_is_used(debs, tmp_path):
    lk, files = debs
    one = build(lk, files, tmp_path / "one")
    two = build(lk, files, tmp_path / "two")
    assert (one.layer.diff_id, one.layer.digest) == (two.layer.diff_id, two.layer.digest)
    again = build(lk, files, tmp_path / "one")
    assert again.fragment is None and again.layer.digest == one.layer.digest  # recalled, nothing unpacked


def test_a_deb_that_does_not_match_the_lock_fails_naming_the_file_and_the_fix(debs, tmp_path):
    lk, files = debs
    url = lk.pins[1].url
    tampered = dict(files, **{url: files[url][:-4] + b"evil"})
    with pytest.raises(EnvironmentProblem) as e:
        build(lk, tampered, tmp_path / "one")
    got = hashlib.sha256(tampered[url]).hexdigest()
    assert e.value.message == (f"b.deb: sha256 mismatch (expected {lk.pins[1].sha256}, got {got}): the mirror "
                               "served a different file than the lock pins; re-run `invoke lock --upgrade`")
    missing = {k: v for k, v in files.items() if k != url}
    with pytest.raises(EnvironmentProblem, match="b.deb: not found at") as e:
        build(lk, missing, tmp_path / "two")
    assert "no longer has libb 2.0" in e.value.hint
