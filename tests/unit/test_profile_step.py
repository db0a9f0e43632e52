"""benchmarks/profile_step.py --host-phases times the host's phases of every step it launches,
booked to the kind of step the table above it counts."""
import importlib
import re
from pathlib import Path


def test_host_phases_cover_every_launched_step(checkpoint, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "benchmarks"))  # as when run as a script
    profile_step = importlib.import_module("profile_step")
    profile_step.main(["--model", checkpoint(), "--device", "cpu", "--workload", "chat", "--scale", "0.002",
                       "--max-input-len", "24", "--max-output-len", "4", "--host-phases"])
    out = capsys.readouterr().out
    kinds = {m[0].strip(): int(m[1]) for m in re.findall(r"^(with prefill|decode [\d-]+)\s+(\d+)", out, re.M)}
    phases = {m[0]: (int(m[1]), m[2]) for m in re.findall(r"^host ms/step, (.+?) \((\d+) steps\): (.*)$", out, re.M)}
    assert kinds.get("with prefill") and phases["with prefill"][0] == kinds["with prefill"]
    assert phases["decode"][0] == sum(n for k, n in kinds.items() if k.startswith("decode"))
    for _, cells in phases.values():
        times = dict(re.findall(r"([a-z][a-z (+)]*?) ([\d.]+)", cells))
        assert set(times) == set(profile_step.HOST_PHASES) and float(times["launch"]) > 0, cells
