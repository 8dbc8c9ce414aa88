"""IMA measurement list: codec, template hashes, boot_aggregate, replay."""

from __future__ import annotations

import hashlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keytrio.protocol import ima, tpm2
from keytrio.protocol.errors import DecodeError, ValidationError
from keytrio.protocol.ima import Entry, ImaParseError

# Lines recorded from real kernels (test data of upstream Keylime's IMA parser), each with the
# template hash the kernel computed: they pin the exact template-data layout of every template.
KERNEL_LINES = {
    "ima-ng": "10 7936eb315fb4e74b99e7d461bc5c96049e1ee092 ima-ng sha1:bc026ae66d81713e4e852465e980784dc96651f8"
    " /usr/lib/systemd/systemd",
    "ima": "10 d7026dc672344d3ee372217bdbc7395947788671 ima 6f66d1d8e2fffcc12dfcb78c04b81fe5b8bbae4e /usr/bin/kmod",
    "ima-sig": "10 5d4d5141ccd5066d50dc3f21d79ba02fedc24256 ima-sig"
    " sha256:b8ae0b8dd04a5935cd8165aa2260cd11b658bd71629bdb52256a675a1f73907b /usr/bin/zmore"
    " 030204531f402500483046022100fe24678d21083ead47660e1a2d553a592d777c478d1b0466de6ed484b54956b3022100"
    "cad3adb37f277bbb03544d6107751b4cd4f2289d8353fa36257400a99334d5c3",
    "ima-sig-missing": "10 5426cf3031a43f5bfca183d79950698a95a728f6 ima-sig"
    " sha256:f1125b940480d20ad841d26d5ea253edc0704b5ec1548c891edf212cb1a9365e"
    " /lib/modules/5.4.48-openpower1/kernel/drivers/usb/common/usb-common.ko ",
    "ima-buf": "10 b7862dbbf1383ac6c7cca7f02d981a081aacb1f1 ima-buf sha1:6e0e6fc8a188ef4f059638949adca4d221946906"
    " device_resume "
    "6e616d653d544553543b757569643d43525950542d5645524954592d3965663332653562363562303434323461356138"
    "6562343436636630653731332d544553543b63617061636974793d303b6d616a6f723d3235333b6d696e6f723d303b6d"
    "696e6f725f636f756e743d313b6e756d5f746172676574733d313b6163746976655f7461626c655f686173683d346565"
    "383065333365353635643336333430356634303238393436653837623365396563306335383661666639656630656436"
    "663561653762656237326431333b",
}


def _pcrs(size: int, n: int = 10) -> dict[int, bytes]:
    return {i: bytes([i]) * size for i in range(n)}


# --- known vectors -------------------------------------------------------------------------------


def test_ima_ng_template_hash_by_hand() -> None:
    digest = hashlib.sha256(b"hello\n").digest()
    # d-ng: u32le(8 + 32) "sha256:" NUL digest; n-ng: u32le(15) "/usr/bin/hello" NUL
    data = b"\x28\x00\x00\x00" + b"sha256:\x00" + digest + b"\x0f\x00\x00\x00" + b"/usr/bin/hello\x00"
    e = ima.build_entry("ima-ng", "/usr/bin/hello", "sha256", digest)
    assert ima.template_data(e) == data
    assert e.template_hash == hashlib.sha1(data).digest()
    assert ima.template_hash(e, "sha256") == hashlib.sha256(data).digest()
    assert (
        ima.format_line(e)
        == f"10 {hashlib.sha1(data).hexdigest()} ima-ng sha256:{digest.hex()} /usr/bin/hello"
    )
    assert ima.extend_digest(e, "sha384") == hashlib.sha384(data).digest()


@pytest.mark.parametrize("name", sorted(KERNEL_LINES))
def test_kernel_lines(name: str) -> None:
    line = KERNEL_LINES[name]
    e = ima.parse_line(line, 7)
    assert e.line_no == 7 and e.pcr == 10
    assert ima.check_template_hash(e, "sha1")
    assert ima.format_line(e) == line  # byte-exact, including the ima-sig trailing space
    rebuilt = ima.build_entry(
        e.template, e.path, e.digest_alg, e.digest, signature=e.signature, buf=e.buf, pcr=e.pcr
    )
    assert rebuilt == e


def test_kernel_line_fields() -> None:
    sig = ima.parse_line(KERNEL_LINES["ima-sig-missing"])
    assert sig.signature is None and sig.path.endswith("usb-common.ko")
    legacy = ima.parse_line(KERNEL_LINES["ima"])
    assert legacy.digest_alg == "sha1" and len(ima.template_data(legacy)) == 20 + 256
    buf = ima.parse_line(KERNEL_LINES["ima-buf"])
    assert buf.name == "device_resume" and buf.buf is not None and buf.buf.startswith(b"name=TEST;")


def test_changed_field_breaks_template_hash() -> None:
    line = KERNEL_LINES["ima-ng"].replace("/usr/lib/systemd/systemd", "/usr/lib/systemd/systemD")
    assert not ima.check_template_hash(ima.parse_line(line))


def test_sig_stripped_trailing_space_tolerated() -> None:
    e = ima.parse_line(KERNEL_LINES["ima-sig-missing"].rstrip(" "))
    assert e.signature is None and ima.check_template_hash(e)


def test_spaces_become_underscores() -> None:
    e = ima.build_entry("ima-ng", "/tmp/a b c", "sha256", bytes(32))
    assert e.path == "/tmp/a_b_c"
    assert ima.parse_line(ima.format_line(e)) == e


# --- violations, boot_aggregate ---------------------------------------------------------------


def test_violation_entry() -> None:
    v = ima.violation_entry("/etc/shadow")
    assert v.is_violation and v.template_hash == bytes(20) and v.digest == bytes(32)
    line = ima.format_line(v)
    assert line == f"10 {'0' * 40} ima-ng sha256:{'0' * 64} /etc/shadow"
    assert ima.parse_line(line).is_violation
    for bank, size in tpm2.DIGEST_SIZES.items():
        assert ima.extend_digest(v, bank) == b"\xff" * size
    expected = hashlib.sha256(bytes(32) + b"\xff" * 32).digest()
    assert ima.replay([v], "sha256") == expected
    assert ima.check_template_hash(v)


def test_boot_aggregate() -> None:
    pcrs = _pcrs(32)
    assert ima.boot_aggregate("sha256", pcrs) == hashlib.sha256(b"".join(pcrs[i] for i in range(8))).digest()
    assert (
        ima.boot_aggregate("sha256", pcrs, pcrs_8_9=True)
        == hashlib.sha256(b"".join(pcrs[i] for i in range(10))).digest()
    )
    e = ima.boot_aggregate_entry("sha256", pcrs)
    assert e.path == "boot_aggregate" and e.digest_alg == "sha256" and e.template == "ima-ng"
    assert e.digest == ima.boot_aggregate("sha256", pcrs)
    assert ima.format_line(e).endswith(f"ima-ng sha256:{e.digest.hex()} boot_aggregate")
    legacy = ima.boot_aggregate_entry("sha1", _pcrs(20), template="ima")
    assert ima.format_line(legacy).split(" ")[3] == legacy.digest.hex()
    with pytest.raises(ValidationError):
        ima.boot_aggregate("sha256", {i: bytes(32) for i in range(7)})
    with pytest.raises(ValidationError):
        ima.boot_aggregate("sha256", _pcrs(20))
    with pytest.raises(ValidationError):
        ima.boot_aggregate("md5", _pcrs(16))


# --- replay ------------------------------------------------------------------------------------


def _entries(n: int) -> list[Entry]:
    out = [ima.boot_aggregate_entry("sha256", _pcrs(32))]
    for i in range(n):
        out.append(ima.build_entry("ima-ng", f"/bin/f{i}", "sha256", hashlib.sha256(b"%d" % i).digest()))
    out.insert(3, ima.violation_entry("/tmp/tomtou"))
    return out


def test_replay_by_hand() -> None:
    es = _entries(2)
    for bank in ("sha1", "sha256", "sha384"):
        pcr = bytes(tpm2.DIGEST_SIZES[bank])
        for e in es:
            ext = (
                b"\xff" * tpm2.DIGEST_SIZES[bank]
                if e.is_violation
                else hashlib.new(bank, ima.template_data(e)).digest()
            )
            pcr = hashlib.new(bank, pcr + ext).digest()
        assert ima.replay(es, bank) == pcr
    mid = ima.replay(es[:2], "sha256")
    assert ima.replay(es[2:], "sha256", mid) == ima.replay(es, "sha256")


def test_match_prefix() -> None:
    es = _entries(10)
    target = ima.replay(es[:6], "sha256")
    assert ima.match_prefix(es, "sha256", target) == 6
    assert ima.match_prefix(es, "sha256", bytes(32)) == 0
    assert ima.match_prefix(es, "sha256", b"\x01" * 32) is None
    assert ima.match_prefix(es[6:], "sha256", ima.replay(es, "sha256"), target) == len(es) - 6
    with pytest.raises(ValidationError):
        ima.match_prefix(es, "sha256", target, bytes(20))


def test_replayer_slices_and_advance() -> None:
    es = _entries(20)
    r = ima.Replayer(["sha1", "sha256"])
    r.feed_all(es[:5])
    r.feed_all(es[5:])
    assert r.count == len(es)
    assert r.value("sha1") == ima.replay(es, "sha1") and r.value("sha256") == ima.replay(es, "sha256")

    r2 = ima.Replayer(["sha1", "sha256"])
    quote_pcr = ima.replay(es[:8], "sha256")  # the quote lags behind the log
    assert r2.advance_to(es, "sha256", quote_pcr) == 8
    assert r2.count == 8 and r2.value("sha1") == ima.replay(es[:8], "sha1")
    before = dict(r2.values)
    assert r2.advance_to(es[8:], "sha256", b"\x02" * 32) is None
    assert r2.values == before and r2.count == 8
    # the next poll continues from line 8 with the stored state
    r3 = ima.Replayer(["sha256"], {"sha256": r2.value("sha256")}, count=r2.count)
    assert r3.advance_to(es[8:], "sha256", ima.replay(es, "sha256")) == len(es) - 8


# --- parse_list ---------------------------------------------------------------------------------


def test_parse_list_and_line_numbers() -> None:
    es = _entries(5)
    text = "".join(ima.format_line(e) + "\n" for e in es)
    parsed = ima.parse_list(text)
    assert parsed == es and [e.line_no for e in parsed] == list(range(len(es)))
    tail = ima.parse_list("".join(ima.format_line(e) + "\n" for e in es[3:]), start_line=3)
    assert [e.line_no for e in tail] == list(range(3, len(es)))
    assert ima.parse_list("") == []
    assert ima.parse_list(text.rstrip("\n")) == es
    bad = text.splitlines()
    bad[4] = bad[4].replace("ima-ng", "ima-xx")
    with pytest.raises(ImaParseError) as info:
        ima.parse_list("\n".join(bad), start_line=100)
    assert info.value.line_no == 104
    with pytest.raises(ImaParseError):
        ima.parse_list(text + "\n")  # a blank line is not an entry


@pytest.mark.parametrize(
    "line",
    [
        "",
        "10",
        "10 00 ima-ng sha256:00 /x",  # template hash too short
        "x10 " + "0" * 40 + " ima-ng sha256:" + "0" * 64 + " /x",
        "24 " + "0" * 40 + " ima-ng sha256:" + "0" * 64 + " /x",
        "10 " + "0" * 40 + " ima-ng sha256:" + "0" * 62 + " /x",
        "10 " + "0" * 40 + " ima-ng sha999:" + "0" * 64 + " /x",
        "10 " + "0" * 40 + " ima-ng " + "0" * 64 + " /x",
        "10 " + "0" * 40 + " ima-ng sha256:" + "0" * 64,
        "10 " + "0" * 40 + " ima-ng sha256:" + "0" * 64 + " /x\0y",
        "10 " + "0" * 40 + " ima-sig sha256:" + "0" * 64 + " /x zz",
        "10 " + "0" * 40 + " ima-buf sha256:" + "0" * 64 + " name",
        "10 " + "0" * 40 + " ima " + "0" * 64 + " /x",
        "10 " + "0" * 40 + " ima " + "0" * 40 + " " + "a" * 256,
        "10 " + "0" * 38 + "\u0660\u0661" + " ima-ng sha256:" + "0" * 64 + " /x",  # non-ASCII digits
        "10 " + "0" * 40 + " ima-ng sha256:" + "0" * 64 + " /\udc00x",
    ],
)
def test_bad_lines(line: str) -> None:
    with pytest.raises(ImaParseError):
        ima.parse_line(line)


# --- properties ----------------------------------------------------------------------------------

_path_chars = st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\0")


@st.composite
def entries(draw: st.DrawFn) -> Entry:
    template = draw(st.sampled_from(ima.TEMPLATES))
    if template == "ima":
        alg = draw(st.sampled_from(["sha1", "md5"]))
        path = draw(st.text(_path_chars, max_size=40))
    else:
        alg = draw(st.sampled_from(sorted(ima.KERNEL_DIGEST_SIZES)))
        path = draw(st.text(_path_chars, max_size=80))
    digest = draw(st.binary(min_size=ima.KERNEL_DIGEST_SIZES[alg], max_size=ima.KERNEL_DIGEST_SIZES[alg]))
    sig = draw(st.one_of(st.none(), st.binary(max_size=80))) if template == "ima-sig" else None
    buf = draw(st.binary(max_size=80)) if template == "ima-buf" else None
    th_alg = draw(st.sampled_from(sorted(tpm2.DIGEST_SIZES)))
    return ima.build_entry(template, path, alg, digest, signature=sig, buf=buf, template_hash_alg=th_alg)


@settings(max_examples=300, deadline=None)
@given(entries(), st.integers(0, 10**6))
def test_round_trip(e: Entry, line_no: int) -> None:
    line = ima.format_line(e)
    back = ima.parse_line(line, line_no)
    assert back == e and back.line_no == line_no
    alg = {20: "sha1", 32: "sha256", 48: "sha384", 64: "sha512"}[len(e.template_hash)]
    assert ima.check_template_hash(back, alg)
    assert ima.format_line(back) == line


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_random_text_only_typed_errors(text: str) -> None:
    try:
        ima.parse_list(text, start_line=5)
    except ImaParseError as exc:
        assert exc.line_no >= 5


@settings(max_examples=300, deadline=None)
@given(entries(), st.data())
def test_truncated_and_mutated_lines(e: Entry, data: st.DataObject) -> None:
    line = ima.format_line(e)
    cut = data.draw(st.integers(0, len(line)))
    pos = data.draw(st.integers(0, max(len(line) - 1, 0)))
    ch = data.draw(st.characters())
    for variant in (line[:cut], line[:pos] + ch + line[pos + 1 :], line[:pos] + " " + line[pos:]):
        try:
            parsed = ima.parse_line(variant)
        except DecodeError:
            continue
        # whatever still parses is a consistent entry
        assert ima.parse_line(ima.format_line(parsed)) == parsed


@given(st.binary(max_size=200))
def test_random_bytes_decoded_only_typed_errors(raw: bytes) -> None:
    try:
        ima.parse_list(raw.decode("utf-8", "surrogateescape"))
    except ImaParseError:
        pass


def test_non_utf8_path_round_trips_via_surrogateescape() -> None:
    raw_line = b"10 " + b"0" * 40 + b" ima-ng sha256:" + b"1" * 64 + b" /tmp/\xff\xfe"
    e = ima.parse_line(raw_line.decode("utf-8", "surrogateescape"))
    assert ima.template_data(e).endswith(struct.pack("<I", 8) + b"/tmp/\xff\xfe\x00")


def test_build_entry_validation() -> None:
    with pytest.raises(ValidationError):
        ima.build_entry("ima-xx", "/x", "sha256", bytes(32))
    with pytest.raises(ValidationError):
        ima.build_entry("ima-ng", "/x", "sha256", bytes(20))
    with pytest.raises(ValidationError):
        ima.build_entry("ima", "/x", "sha256", bytes(32))
    with pytest.raises(ValidationError):
        ima.build_entry("ima-ng", "/x\ny", "sha256", bytes(32))
    with pytest.raises(ValidationError):
        ima.build_entry("ima-buf", "n", "sha256", bytes(32))  # buf required
    with pytest.raises(ValidationError):
        ima.build_entry("ima-ng", "/x", "sha256", bytes(32), signature=b"s")
    with pytest.raises(ValidationError):
        ima.build_entry("ima-ng", "/x", "sha256", bytes(32), template_hash_alg="md5")
