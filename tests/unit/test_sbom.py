"""The SBOM of an image: what it lists, that its bytes are reproducible, and
how it is attached to the image in a registry (against a fake registry
without the referrers API, like Debian's docker-registry 2.8)."""

from __future__ import annotations

import json
import uuid
from types import SimpleNamespace

import pytest

from orchestrator.debian import locks as apt_locks
from orchestrator.oci import backends
from orchestrator.project import lock as lock_mod
from orchestrator.oci import sbom
from orchestrator.project import spec
from orchestrator.flow import load_all_locks
from orchestrator.common.errors import EnvironmentProblem, UserError
from orchestrator.build.plan import make_plan
from orchestrator.oci.registry import OCI_INDEX, OCI_MANIFEST, Registry, sha256_digest

from ..conftest import FIXTURES
from .test_registry_transport import fake, isolated  # noqa: F401 - fixtures

IMAGE = "sha256:" + "a" * 64
BASE = "sha256:" + "b" * 64
CUBLAS = ("0f8aa1706812e00b9f19dfe0cdb3999b092ccb8ca168c0db5b8ea712456fd9b3",
          "2fc8da60df463fdefa81e323eef2e36489e1c94335b5358bcb38360adf75ac9b")
LOCK_TEXT = f"""nvidia-cublas-cu12==12.4.5.8 \\
    --hash=sha256:{CUBLAS[1]} \\
    --hash=sha256:{CUBLAS[0]}
    # via torch
jq-python==1.0 \\
    --hash=sha256:{"c" * 64}
"""


def contents(digest: str = IMAGE, wheels=None, debs=None) -> sbom.Contents:
    if wheels is None:
        wheels = [sbom.Wheel(p.name, p.version, sbom.wheel_hashes(p.block, "lock"), "cuda-libs")
                  for p in lock_mod.parse_pins(LOCK_TEXT)]
    if debs is None:
        debs = [sbom.Deb("ffmpeg", "7:5.1.9-0+deb12u1", "amd64", "d" * 64, "system-echo"),
                sbom.Deb("jq", "1.6-2.1", "amd64", "e" * 64, "system")]
    return sbom.Contents("morgan/tts", digest, "linux/amd64", "orchestrator/base-bookworm", BASE, "bookworm",
                         tuple(wheels), tuple(debs), (("libc6", "2.36-9+deb12u13"), ("python3", "3.11.2-1+b1")))


def components(data: bytes) -> dict[str, dict]:
    return {c["purl"]: c for c in json.loads(data)["components"]}


# -- the document --------------------------------------------------------------

def test_the_same_image_gives_the_same_sbom_bytes_whatever_the_order_of_its_inputs():
    c = contents()
    shuffled = contents(wheels=list(reversed(c.wheels)), debs=list(reversed(c.debs)))
    assert sbom.document(c) == sbom.document(c) == sbom.document(shuffled)


def test_serial_number_comes_from_the_image_digest_and_the_time_from_source_date_epoch():
    doc = json.loads(sbom.document(contents()))
    assert doc["serialNumber"] == f"urn:uuid:{uuid.uuid5(sbom.SERIAL_NAMESPACE, IMAGE)}"
    assert doc["metadata"]["timestamp"] == "1980-01-01T00:00:00+00:00"  # layers.SOURCE_DATE_EPOCH
    other = json.loads(sbom.document(contents(digest="sha256:" + "f" * 64)))
    assert other["serialNumber"] != doc["serialNumber"]


def test_every_wheel_is_listed_with_its_version_and_every_sha256_its_lock_allows():
    found = components(sbom.document(contents()))
    cublas = found["pkg:pypi/nvidia-cublas-cu12@12.4.5.8"]
    assert cublas["version"] == "12.4.5.8"
    assert sorted(h["content"] for h in cublas["hashes"]) == sorted(CUBLAS)
    assert {h["alg"] for h in cublas["hashes"]} == {"SHA-256"}
    assert {"name": "orchestrator:layer", "value": "cuda-libs"} in cublas["properties"]
    assert "pkg:pypi/jq-python@1.0" in found


def test_debian_packages_are_deb_purls_with_the_sha256_of_their_deb():
    found = components(sbom.document(contents()))
    ffmpeg = found["pkg:deb/debian/ffmpeg@7:5.1.9-0%2Bdeb12u1?arch=amd64&distro=bookworm"]
    assert ffmpeg["version"] == "7:5.1.9-0+deb12u1"
    assert ffmpeg["hashes"] == [{"alg": "SHA-256", "content": "d" * 64}]


def test_the_base_is_a_container_component_pinned_by_digest_and_the_image_is_the_subject():
    doc = json.loads(sbom.document(contents()))
    base = [c for c in doc["components"] if c["type"] == "container"]
    assert [(c["name"], c["version"], c["hashes"][0]["content"]) for c in base] == \
        [("orchestrator/base-bookworm", BASE, "b" * 64)]
    image = doc["metadata"]["component"]
    assert (image["type"], image["name"], image["version"]) == ("container", "morgan/tts", IMAGE)
    assert "127.0.0.1" not in json.dumps(doc)  # no registry host: one SBOM digest in every registry
    # The image depends on its layers' packages and the base; the base on its own packages.
    graph = {d["ref"]: set(d.get("dependsOn", ())) for d in doc["dependencies"]}
    in_base = {c["bom-ref"] for c in doc["components"] if c["type"] == "library"
               and {"name": "orchestrator:layer", "value": "base"} in c["properties"]}
    assert in_base == {"pkg:deb/debian/libc6@2.36-9%2Bdeb12u13?distro=bookworm",
                       "pkg:deb/debian/python3@3.11.2-1%2Bb1?distro=bookworm"}
    assert graph[image["bom-ref"]] == {c["bom-ref"] for c in doc["components"]} - in_base
    assert graph[base[0]["bom-ref"]] == in_base


def test_the_document_is_valid_cyclonedx_1_6():
    data = sbom.document(contents())
    assert json.loads(data)["specVersion"] == "1.6"
    assert sbom.validation_errors(data) is None
    broken = json.loads(data)
    broken["components"][0]["hashes"][0]["alg"] = "SHA-257"
    assert sbom.validation_errors(json.dumps(broken).encode()) is not None


def test_a_pin_without_a_hash_is_refused():
    with pytest.raises(UserError, match="no sha256 hash"):
        sbom.wheel_hashes("requests==2.32.0\n", "locks/cpu-amd64/shared.txt")


def test_a_cuda_service_sbom_lists_its_cuda_libs_wheels_and_its_debian_packages():
    project = spec.load(FIXTURES / "mini" / "project.yaml")
    plan = make_plan(project, load_all_locks(project), system=apt_locks.load_apt_locks(project))
    config = json.dumps({"config": {"Labels": {sbom.BASE_NAME_LABEL: "orchestrator/base-bookworm",
                                               sbom.BASE_DIGEST_LABEL: BASE}}}).encode()
    built = {(i.key, i.backend.name, i.platform): SimpleNamespace(image=i, digest=IMAGE,
                                                                  assembled=SimpleNamespace(config=config))
             for i in plan.images}
    echo, libs = built[("echo", "cuda", "linux/amd64")], built[("cuda-libs", "cuda", "linux/amd64")]
    c = sbom.contents(project.name, project.base.suite, echo, libs)
    found = components(sbom.document(c))
    assert c.base_packages == ()  # no base pin given: the base is named by digest only
    libs_pins = libs.image.layers[0].lock.pins
    assert {p.name for p in libs_pins} == {"nvidia-cuda-runtime-cu12"}
    for pin in [*libs_pins, *(p for s in echo.image.layers for p in s.lock.pins)]:
        assert found[f"pkg:pypi/{pin.name}@{pin.version}"]["hashes"], pin.name
    debs = {p.name for s in echo.image.system for p in s.lock.pins}
    assert {"jq", "ffmpeg"} <= debs
    assert debs == {c["name"] for c in found.values() if c["purl"].startswith("pkg:deb/")}
    assert c.base_digest == BASE


def test_the_base_packages_are_listed_only_when_the_image_sits_on_the_pinned_base():
    pin = SimpleNamespace(diff_ids=("sha256:" + "1" * 64,), packages=("libc6=2.36-9+deb12u13", "python3=3.11.2-1+b1"))

    def built(diff_ids):
        config = {"config": {"Labels": {sbom.BASE_DIGEST_LABEL: BASE}}, "rootfs": {"diff_ids": diff_ids}}
        plan = SimpleNamespace(key="tts", backend=SimpleNamespace(name="cpu"), platform="linux/amd64", arch="amd64",
                               layers=(), system=())
        return SimpleNamespace(image=plan, digest=IMAGE, assembled=SimpleNamespace(config=json.dumps(config)))

    on_pin = sbom.contents("morgan", "bookworm", built([pin.diff_ids[0], "sha256:" + "2" * 64]), base_pin=pin)
    assert on_pin.base_packages == (("libc6", "2.36-9+deb12u13"), ("python3", "3.11.2-1+b1"))
    elsewhere = sbom.contents("morgan", "bookworm", built(["sha256:" + "3" * 64]), base_pin=pin)
    assert elsewhere.base_packages == ()


# -- in the registry --------------------------------------------------------------

def test_referrers_tags_follow_the_distribution_spec_schema():
    assert sbom.referrers_tag("sha256:" + "a" * 64) == "sha256-" + "a" * 64
    assert sbom.referrers_tag("sha512:" + "a" * 128) == "sha512-" + "a" * 64
    assert sbom.referrers_tag("test+algorithm+using+algorithm+separators+and+lots:alsoSome=InTheEncoded") == \
        "test-algorithm-using-algorithm-s-alsoSome-InTheEncoded"


def test_an_sbom_is_attached_under_the_referrers_tag_once_keeping_other_referrers(fake):
    f = fake()
    reg = Registry(f.host)
    other = {"mediaType": OCI_MANIFEST, "digest": "sha256:" + "9" * 64, "size": 10,
             "artifactType": "application/vnd.dev.cosign.simplesigning.v1+json"}
    existing = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [other]}).encode()
    reg.put_manifest("p/tts", sbom.referrers_tag(IMAGE), existing, OCI_INDEX)
    payload = sbom.document(contents())
    digest, sent = sbom.push(reg, "p/tts", IMAGE, 1234, "linux/amd64", payload)
    assert sent > len(payload)
    index = reg.get_manifest("p/tts", sbom.referrers_tag(IMAGE)).json
    assert index["manifests"][0] == other
    entry = index["manifests"][1]
    assert (entry["digest"], entry["artifactType"]) == (digest, sbom.MEDIA_TYPE)
    artifact = reg.get_manifest("p/tts", digest).json
    assert artifact["subject"] == {"mediaType": OCI_MANIFEST, "digest": IMAGE, "size": 1234}
    assert entry["annotations"] == artifact["annotations"]  # copied, as the spec asks
    again, sent_again = sbom.push(reg, "p/tts", IMAGE, 1234, "linux/amd64", payload)
    assert (again, sent_again) == (digest, 0)
    assert len(reg.get_manifest("p/tts", sbom.referrers_tag(IMAGE)).json["manifests"]) == 2  # no duplicate


def test_a_new_sbom_of_the_same_image_replaces_the_one_this_tool_attached_before(fake):
    f = fake()
    reg = Registry(f.host)
    old, _ = sbom.push(reg, "p/tts", IMAGE, 1234, "linux/amd64", sbom.document(contents(debs=[])))
    new, _ = sbom.push(reg, "p/tts", IMAGE, 1234, "linux/amd64", sbom.document(contents()))
    assert old != new
    listed = reg.get_manifest("p/tts", sbom.referrers_tag(IMAGE)).json["manifests"]
    assert [d["digest"] for d in listed] == [new]
    assert sbom.fetch(reg, "p/tts", IMAGE) == sbom.document(contents())


def test_the_sbom_is_found_through_the_image_digest_and_checked(fake):
    f = fake()
    reg = Registry(f.host)
    assert reg.referrers("p/tts", IMAGE) is None  # this registry lacks the API: the tag schema is used
    with pytest.raises(UserError, match="has no SBOM attached"):
        sbom.fetch(reg, "p/tts", IMAGE)
    payload = sbom.document(contents())
    digest, _ = sbom.push(reg, "p/tts", IMAGE, 1234, "linux/amd64", payload)
    assert sbom.fetch(reg, "p/tts", IMAGE) == payload
    assert sbom.fetch(reg, "p/tts", IMAGE, expected=digest) == payload
    with pytest.raises(UserError, match="referrers do not list it"):
        sbom.fetch(reg, "p/tts", IMAGE, expected="sha256:" + "0" * 64)


def test_an_sbom_describing_another_image_is_refused(fake):
    f = fake()
    reg = Registry(f.host)
    elsewhere = sbom.document(contents(digest="sha256:" + "f" * 64))
    sbom.push(reg, "p/tts", IMAGE, 1234, "linux/amd64", elsewhere)
    with pytest.raises(UserError, match="describes sha256:f"):
        sbom.fetch(reg, "p/tts", IMAGE)


def test_something_else_under_the_referrers_tag_stops_the_push(fake):
    f = fake()
    reg = Registry(f.host)
    reg.put_manifest("p/tts", sbom.referrers_tag(IMAGE), b'{"schemaVersion":2}', OCI_MANIFEST)
    with pytest.raises(EnvironmentProblem, match="should be the referrers index"):
        sbom.push(reg, "p/tts", IMAGE, 1234, "linux/amd64", sbom.document(contents()))


def test_a_registry_with_the_referrers_api_gets_no_referrers_tag(fake, monkeypatch):
    f = fake()
    reg = Registry(f.host)
    monkeypatch.setattr(reg, "referrers", lambda name, digest, artifact_type=None: [])
    sbom.push(reg, "p/tts", IMAGE, 1234, "linux/amd64", sbom.document(contents()))
    assert reg.get_manifest("p/tts", sbom.referrers_tag(IMAGE)) is None


# -- the backend manifest ------------------------------------------------------------

def manifest(**backend) -> dict:
    image = "reg/p/tts@" + IMAGE
    return {"schemaVersion": 2, "service": "tts", "version": "0.1.0",
            "platforms": {"linux/amd64": {"default": "cpu", "fallback": ["cpu"],
                                          "backends": {"cpu": {"image": image, "size": 1, **backend}}}}}


def test_the_backend_manifest_may_name_each_image_sbom_by_digest():
    backends.validate(manifest(), "old")  # published before SBOMs: still schemaVersion 2 and valid
    backends.validate(manifest(sbom=sha256_digest(b"x")), "new")
    with pytest.raises(UserError, match="sbom"):
        backends.validate(manifest(sbom="latest"), "bad")
