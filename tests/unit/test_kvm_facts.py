"""KVM's facts from a debugfs laid out as KVM lays it out (PID-FD folders, stat files, vcpuN/),
and the plain messages when it is not mounted, not KVM's, or has no folder for this QEMU. The
real KVM is in tests/integration/kvm/test_rig.py."""

from qintrospect.slat import kvm
from qintrospect.errors import QIError


class Qmp:
    def __init__(self, enabled=True, stats=True):
        self.enabled, self.stats = enabled, stats

    def command(self, name, **args):
        if name == "query-kvm":
            return {"enabled": self.enabled, "present": True}
        if name == "query-stats" and self.stats:
            return [{"provider": "kvm", "stats": [{"name": "pages_4k", "value": 476}]}]
        raise QIError(f"{name}: not here")


def debugfs(tmp_path, pid=4242):
    vm = tmp_path / "kvm" / f"{pid}-11"
    (vm / "vcpu0").mkdir(parents=True)
    for name, value in (("pages_4k", "476"), ("pages_2m", "62"), ("pages_1g", "0"),
                        ("tlb_flush", "1234")):
        (vm / name).write_text(value + "\n")
    (vm / "vcpu0" / "guest_mode").write_text("0\n")
    (vm / "vcpu0" / "pid").write_text("4250\n")
    return tmp_path


def test_facts_from_the_vms_folder(tmp_path):
    f = kvm.facts(Qmp(), 4242, str(debugfs(tmp_path)))
    assert f["accelerator"] == "kvm" and f["debugfs"].endswith("kvm/4242-11")
    assert f["stats"] == {"pages_4k": 476, "pages_2m": 62, "pages_1g": 0, "tlb_flush": 1234}
    assert f["vcpus"] == [{"index": 0, "guest_mode": 0, "pid": 4250}]
    assert f["query_stats"][0]["stats"][0]["value"] == 476 and not f["notes"]
    text = kvm.text(f)
    assert "pages_2m 62" in text and "vCPU 0: guest_mode 0" in text


def test_plain_messages(tmp_path):
    f = kvm.facts(Qmp(), 4242, str(tmp_path / "nowhere"))
    assert any("debugfs is not mounted" in n and "mount -t debugfs" in n for n in f["notes"])
    root = debugfs(tmp_path)
    f = kvm.facts(Qmp(), 999, str(root))
    assert any("no folder 999-FD" in n for n in f["notes"])
    f = kvm.facts(Qmp(enabled=False, stats=False), 4242, str(root))
    assert f["accelerator"].startswith("tcg") and f["query_stats"] is None
    f = kvm.facts(Qmp(stats=False), None, str(root))
    assert any("not local" in n for n in f["notes"])
    assert any("query-stats is not available" in n for n in f["notes"])
