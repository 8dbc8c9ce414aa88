"""``keytrio policy create runtime|sign|verify`` through its argparse verbs: the policies it makes
parse with the verifier's own code and pass (or fail) the verifier's IMA evaluation on real logs;
results equal what upstream's ``keylime-policy`` made from the same inputs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from keytrio.protocol import dsse
from keytrio.protocol.ima_eval import ImaProgress, evaluate_ima
from keytrio.protocol.ima_rules import NOT_IN_ALLOWLIST, RUNTIME_POLICY_HASH, TOMTOU
from keytrio.protocol.runtime_policy import load_policy, parse_policy
from keytrio.testbed.ima_log import ImaLog
from tests.actors.tools.policy_support import policy, policy_parser

UPSTREAM = Path(__file__).resolve().parents[2] / "protocol" / "data" / "keylime"
TREE = {"usr/bin/hello": b"hello\n", "usr/bin/world": b"world\n", "etc/app.conf": b"conf\n",
        "tmp/scratch": b"changes all the time\n", "var/log/app.log": b"log\n"}


def make_tree(root: Path) -> Path:
    for rel, data in TREE.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


class SoftPcr:
    """PCR 10 in software: the ``extend`` ImaLog drives (the verifier only sees the final value)."""

    def __init__(self, banks: tuple[str, ...] = ("sha1", "sha256")) -> None:
        self.values = {b: bytes(hashlib.new(b).digest_size) for b in banks}

    async def extend(self, pcr: int, digests: dict[str, bytes]) -> None:
        for bank, d in digests.items():
            self.values[bank] = hashlib.new(bank, self.values[bank] + d).digest()


async def ima_log(path: Path, files: dict[str, bytes], *, tomtou: str | None = None) -> tuple[ImaLog, SoftPcr]:
    pcr = SoftPcr()
    log = ImaLog(path, pcr.extend, list(pcr.values))
    await log.boot_aggregate({"sha256": {i: bytes(32) for i in range(8)}, "sha1": {i: bytes(20) for i in range(8)}})
    for name, data in files.items():
        await log.measure(name, data)
    if tomtou:
        await log.tomtou(tomtou)
    return log, pcr


def evaluate(policy_text: str, log: ImaLog, pcr: SoftPcr) -> list[str]:
    res = evaluate_ima(log.text(), 0, pcr.values["sha256"], "sha256", parse_policy(policy_text), ImaProgress())
    return [f.event_id for f in res.failures]


# --- create -----------------------------------------------------------------------------------------


async def test_create_from_tree_matches_upstream_and_passes_evaluation(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "root")
    out = tmp_path / "tree.json"
    code, stdout, err = policy("create", "runtime", "--root", root, "--exclude", "/tmp/.*",
                               "--exclude", "/var/log/.*", "-o", out)
    assert code == 0 and stdout == "" and "3 paths, 2 excludes" in err
    doc = json.loads(out.read_text())
    upstream = json.loads((UPSTREAM / "policy_rootfs.json").read_text())
    for section in ("digests", "excludes", "keyrings", "ima", "ima-buf", "verification-keys", "release"):
        assert doc[section] == upstream[section], section
    assert doc["meta"]["version"] == 1 and "/tmp/scratch" not in doc["digests"]

    # the files as measured by IMA pass; the excluded ones pass by regex; a changed file fails
    files = {"/" + k: v for k, v in TREE.items()}
    log, pcr = await ima_log(tmp_path / "ok.log", files)
    assert evaluate(out.read_text(), log, pcr) == []
    log, pcr = await ima_log(tmp_path / "bad.log", {**files, "/usr/bin/hello": b"trojan\n"})
    assert evaluate(out.read_text(), log, pcr) == [RUNTIME_POLICY_HASH]
    log, pcr = await ima_log(tmp_path / "new.log", {**files, "/usr/bin/new": b"x"})
    assert evaluate(out.read_text(), log, pcr) == [NOT_IN_ALLOWLIST]

    # stdout and --hash sha512
    code, stdout, _ = policy("create", "runtime", "--root", root, "--hash", "sha512")
    assert code == 0
    assert json.loads(stdout)["digests"]["/tmp/scratch"] == [hashlib.sha512(TREE["tmp/scratch"]).hexdigest()]


async def test_create_from_ima_log_passes_on_its_log(tmp_path: Path) -> None:
    files = {"/usr/bin/bash": b"bash", "/usr/lib/libc.so.6": b"libc", "/etc/passwd": b"root:x:0:0"}
    log, pcr = await ima_log(tmp_path / "ascii_runtime_measurements", files)
    await log.buf("device_resume", b"name=TEST;")
    out = tmp_path / "ima.json"
    code, _, err = policy("create", "runtime", "--ima-log", log.path, "-o", out)
    assert code == 0, err
    doc = json.loads(out.read_text())
    assert set(doc["digests"]) == {"boot_aggregate", *files}
    assert doc["ima-buf"] == {"device_resume": [hashlib.sha256(b"name=TEST;").hexdigest()]}
    assert evaluate(out.read_text(), log, pcr) == []
    # the same policy does not cover another machine's log
    other, other_pcr = await ima_log(tmp_path / "other", {"/usr/bin/bash": b"other bash"})
    assert evaluate(out.read_text(), other, other_pcr) == [RUNTIME_POLICY_HASH]
    # a ToMToU line is not policy material (and the verdict still reports it)
    log2, pcr2 = await ima_log(tmp_path / "tomtou", files, tomtou="/var/tmp/x")
    assert policy("create", "runtime", "--ima-log", log2.path, "-o", tmp_path / "t.json")[0] == 0
    assert "/var/tmp/x" not in json.loads((tmp_path / "t.json").read_text())["digests"]
    assert evaluate((tmp_path / "t.json").read_text(), log2, pcr2) == [TOMTOU]


def test_create_reproduces_upstream_ima_and_merge(tmp_path: Path) -> None:
    out = tmp_path / "ima.json"
    assert policy("create", "runtime", "--ima-log", UPSTREAM / "ima_list.txt",
                  "--ima-key", UPSTREAM / "ima_cert.der", "-o", out)[0] == 0
    doc, upstream = json.loads(out.read_text()), json.loads((UPSTREAM / "policy_ima.json").read_text())
    assert {k: v for k, v in doc.items() if k != "meta"} == {k: v for k, v in upstream.items() if k != "meta"}

    merged = tmp_path / "merged.json"
    assert policy("create", "runtime", "--base", UPSTREAM / "policy_rootfs.json",
                  "--allowlist", UPSTREAM / "allowlist.txt", "-o", merged)[0] == 0
    assert json.loads(merged.read_text())["digests"] == json.loads((UPSTREAM / "policy_merged.json").read_text())["digests"]

    lines = tmp_path / "allow.txt"
    lines.write_text(f"# comment\n{hashlib.sha256(b'a').hexdigest()}  /bin/a\n\n{hashlib.sha384(b'b').hexdigest()} */bin/b\n")
    code, stdout, _ = policy("create", "runtime", "--allowlist", lines)
    assert code == 0
    parsed = parse_policy(stdout)
    assert parsed.digests["/bin/a"] == {hashlib.sha256(b"a").digest()}
    assert parsed.digests["/bin/b"] == {hashlib.sha384(b"b").digest()}


def test_create_usage_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text("not-a-digest /bin/x\n")
    cases = [
        (("create", "runtime"), "give at least one of"),
        (("create", "runtime", "--allowlist", bad), "allowlist line 1"),
        (("create", "runtime", "--allowlist", tmp_path / "missing"), "unreadable"),
        (("create", "runtime", "--root", tmp_path, "--exclude", "(unclosed"), "not a regular expression"),
        (("create", "runtime", "--ima-log", bad), "IMA log"),
        (("create", "runtime", "--root", tmp_path / "nope"), "not a directory"),
    ]
    for argv, text in cases:
        code, stdout, err = policy(*argv)
        assert (code, stdout) == (2, ""), argv
        assert text in err and err.count("\n") == 1, err
    with pytest.raises(SystemExit) as exc:  # argparse: unknown hash
        policy_parser().parse_args(["policy", "create", "runtime", "--hash", "md5"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        policy_parser().parse_args(["policy", "sign", str(bad)])  # --key or --keyout is required


# --- sign / verify ----------------------------------------------------------------------------------


def test_sign_verify_round_trip(tmp_path: Path) -> None:
    plain = UPSTREAM / "policy_rootfs.json"
    key = tmp_path / "signer.pem"
    signed = tmp_path / "signed.json"
    code, _, err = policy("sign", plain, "--keyout", key, "-o", signed)
    assert code == 0 and "signer.pem.pub" in err
    assert key.stat().st_mode & 0o777 == 0o600
    pub = tmp_path / "signer.pem.pub"
    env = json.loads(signed.read_text())
    assert env["payloadType"] == dsse.KEYLIME_PAYLOAD_TYPE
    # the verifier's loader accepts it with the key and returns the same policy
    assert load_policy(signed.read_bytes(), signing_key=pub.read_bytes()).digests == parse_policy(plain.read_bytes()).digests

    code, out, _ = policy("verify", signed, "--key", pub)
    assert code == 0 and "valid signature" in out
    # signing again with --key gives the same (deterministic) envelope
    code, stdout, _ = policy("sign", plain, "--key", key)
    assert code == 0 and json.loads(stdout) == env

    # the wrong key, a tampered payload, an unsigned policy: 4 (invalid), one line
    other = tmp_path / "other.pub"
    other.write_bytes(ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    code, _, err = policy("verify", signed, "--key", other)
    assert code == 4 and "NOT valid" in err and err.count("\n") == 1
    tampered = tmp_path / "tampered.json"
    payload = json.loads(plain.read_text())
    payload["digests"]["/usr/bin/evil"] = ["00" * 32]
    tampered.write_text(json.dumps({**env, "payload": __import__("base64").b64encode(json.dumps(payload).encode()).decode()}))
    assert policy("verify", tampered, "--key", pub)[0] == 4
    assert policy("verify", plain, "--key", pub)[0] == 4
    # signing something that is not a valid policy, or with a non-EC key: usage (2)
    bad = tmp_path / "bad.json"
    bad.write_text('{"meta": {"version": 2}}')
    assert policy("sign", bad, "--key", key)[0] == 2
    assert policy("sign", signed, "--key", key)[0] == 2  # already an envelope
    assert policy("verify", signed, "--key", tmp_path / "missing.pem")[0] == 2


def test_upstream_signed_policies_verify() -> None:
    code, out, _ = policy("verify", UPSTREAM / "signed_ecdsa.json", "--key", UPSTREAM / "ecdsa_pub.pem")
    assert code == 0 and "3 paths" in out
    assert policy("verify", UPSTREAM / "signed_x509.json", "--key", UPSTREAM / "x509_cert.pem")[0] == 0
    assert policy("verify", UPSTREAM / "signed_x509.json", "--key", UPSTREAM / "ecdsa_pub.pem")[0] == 4


# --- create measured-boot on real logs ---------------------------------------------------------------

REAL_LOGS = Path(__file__).resolve().parents[2] / "protocol" / "data" / "eventlogs"


def test_create_measured_boot_errors_name_the_field_and_the_event(tmp_path: Path) -> None:
    log = REAL_LOGS / "t2t_event-bootorder.bin"
    code, out, err = policy("create", "measured-boot", "-e", log)
    assert (code, out) == (2, "") and err.count("\n") == 1
    assert "event_log: Secure Boot is disabled in this log (event 4 (PCR 7, EV_EFI_VARIABLE_DRIVER_CONFIG, " \
           "byte 319) says so)" in err
    code, out, err = policy("create", "measured-boot", "-e", REAL_LOGS / "t2t_specid-vendordata.bin")
    assert code == 2 and "not a UEFI event log (Spec ID event: vendorInfoSize 4" in err and "(at byte 68)" in err
    code, out, err = policy("create", "measured-boot", "-e", log, "-i", "-o", tmp_path / "ref.json")
    assert code == 0 and "secure boot off" in err
    ref = json.loads((tmp_path / "ref.json").read_text())
    assert set(ref["kernels"][0]) == {"shim_authcode_sha256", "grub_authcode_sha256", "initrd_plain_sha256",
                                      "vmlinuz_plain_sha256", "kernel_cmdline"}  # upstream's format: it can say it
    code, out, err = policy("create", "measured-boot", "-e", REAL_LOGS / "t2t_event-sd-boot-fedora37.bin", "-i")
    assert code == 0 and "boot_applications" in json.loads(out)["kernels"][0]
