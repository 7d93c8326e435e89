"""Issue: check against the in-guest modules.

Our own gpt_dump module runs in the bundled guest; its log is compared with the live outside
walk, level by level. A log with one bit changed is a difference at the right level, exit 1.
"""

import re

import pytest

from .conftest import attach_args, booted, run_cli, run_json

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def g():
    with booted("max", probe="sleep") as guest:
        yield guest


def module_log(g, gva, pid=None):
    """Load gpt_dump for (pid, gva) in the guest and return what it printed."""
    pid = g.probe["pid"] if pid is None else pid
    g.run("dmesg -c > /dev/null")
    out = g.run(f"insmod /modules/gpt_dump.ko pid={pid} gva={gva:#x}")
    assert g.last_status == 0, out
    text = g.run("dmesg")
    g.run("rmmod gpt_dump")
    assert "gpt_dump: end" in text, text
    return text


@pytest.mark.parametrize("region", ["heap", "thp", "untouched", "stack"])
def test_module_log_agrees_with_outside_walk(g, tmp_path, region):
    r = g.probe["regions"][region]
    log = tmp_path / f"{region}.log"
    log.write_text(module_log(g, r["gva"]))
    rc, out, err = run_json("compare", "--log", str(log), *attach_args(g))
    assert rc == 0, (err, out)
    result = out[0]
    assert result["agree"] is True
    rows = result["rows"]
    assert not [x for x in rows if x["agree"] is False]
    compared = {(x["field"], x["level"]) for x in rows if x["agree"] is True}
    assert ("root", None) in compared
    for level in ("PGD", "P4D", "PUD"):  # 5-level under -cpu max
        assert ("entry", level) in compared and ("index", level) in compared
    if region == "untouched":
        assert result["outside"]["fault"]["reason"] == "not-present"
    else:
        assert ("final", None) in compared and ("value", None) in compared
        assert int(result["outside"]["gpa"], 16) == r["gpa"]
    if region == "thp" and r["thp"]:
        assert ("page_size", "PMD") in compared
    # the human view names every level, side by side
    rc, text, err = run_cli("compare", "--log", str(log), *attach_args(g))
    assert rc == 0 and "agrees with the log at every level" in text


def test_kernel_direct_map_address_is_explained(g, tmp_path):
    heap = g.probe["regions"]["heap"]
    rc, out, err = run_json("translate", *attach_args(g), "--find-cr3", "--expect",
                            hex(heap["value"]), hex(heap["gva"]))
    # the module prints page_offset_base: the direct-map alias of the heap's GPA
    base = re.search(r"page_offset_base: (0x[0-9a-f]+)", module_log(g, heap["gva"]))
    gva = int(base.group(1), 16) + heap["gpa"]
    log = tmp_path / "direct.log"
    log.write_text(module_log(g, gva))
    rc, out, err = run_json("compare", "--log", str(log), *attach_args(g))
    assert rc == 0, err
    assert "direct-map alias" in out[0]["explain"] and "by construction" in out[0]["explain"]
    assert int(out[0]["outside"]["gpa"], 16) == heap["gpa"]


def flip_entry_bit(text, level, bit):
    """Change one bit of one entry everywhere the log prints it (hex and binary lines)."""
    def hex_line(m):
        return m.group(1) + f"{int(m.group(2), 16) ^ (1 << bit):#018x}"
    text = re.sub(rf"({level} entry: )(0x[0-9a-f]+)", hex_line, text)

    def bin_line(m):
        bits = list(m.group(2).replace(" ", ""))
        bits[63 - bit] = "1" if bits[63 - bit] == "0" else "0"
        b = "".join(bits)
        return m.group(1) + f"{b[:12]} {b[12:52]} {b[52:]}"
    return re.sub(rf"(: {level} )([01]{{12}} [01]{{40}} [01]{{12}})", bin_line, text)


def test_one_flipped_bit_is_a_difference_at_its_level(g, tmp_path):
    heap = g.probe["regions"]["heap"]
    text = module_log(g, heap["gva"])
    log = tmp_path / "flipped.log"
    log.write_text(flip_entry_bit(text, "PMD", 1))  # RW of the PMD entry
    rc, out, err = run_json("compare", "--log", str(log), *attach_args(g))
    assert rc == 1
    diffs = [x for x in out[0]["rows"] if x["agree"] is False]
    assert [(x["field"], x["level"]) for x in diffs] == [("entry", "PMD")]
    assert "RW" in diffs[0]["reason"] and "bit 1" in diffs[0]["reason"]
    rc, text_out, err = run_cli("compare", "--log", str(log), *attach_args(g))
    assert rc == 1 and "DIFFER" in text_out


def test_parse_log_offline_on_the_seed():
    rc, out, err = run_json("parse-log", "tests/data/seed_gpt_dump.log",
                            "tests/data/seed_ept_dump.log")
    assert rc == 1  # the seed's own HPA line disagrees with its entries at bit 7
    gpt, ept, chain = out
    assert gpt["log"]["kind"] == "gpt_dump" and [lvl["index"] for lvl in gpt["log"]["levels"]] \
        == [284, 161, 435, 83]
    assert int(gpt["log"]["value"], 16) == 1772334
    hpa = [c for c in ept["checks"] if c["check"] == "final"]
    assert hpa and hpa[0]["computed"] == "0x10853be8" and hpa[0]["agree"] is False
    assert chain["chain"]["gpa_agree"] is True and chain["chain"]["value_agree"] is True
    rc, out, err = run_cli("parse-log", "tests/data/seed_gpt_dump.log")
    assert rc == 0 and "284" in out
    rc, out, err = run_cli("parse-log", "README.md")
    assert rc == 2 and "Traceback" not in err


def test_ept_log_against_this_host(g):
    """The seed's ept_dump walked GPA 0x36653be8 of another machine's VM: here that GPA is not
    RAM of the bundled guest (256 MiB), so nothing can be compared: said, exit 1."""
    rc, out, err = run_json("compare", "--log", "tests/data/seed_ept_dump.log", *attach_args(g))
    assert rc == 1, err
    assert out[0]["kind"] == "ept_dump" and out[0]["compared"] is False
    assert "unassigned" in out[0]["rows"][0]["reason"]
    rc, text, err = run_cli("compare", "--log", "tests/data/seed_ept_dump.log", *attach_args(g))
    assert rc == 1 and "nothing could be compared" in text
