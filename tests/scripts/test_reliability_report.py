"""scripts/reliability_report.py: the table from a small fuzz JSON and figures (no server, no jax)."""
from __future__ import annotations

import json

from script_loader import load_script

rr = load_script("reliability_report")


def _rows(table: str) -> dict:
    out = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 2 and cells[0] not in ("Figure", "---"):
            out[cells[0]] = cells[1]
    return out


def test_nothing_run_says_not_run():
    rows = _rows(rr.build_table(None, None, None))
    assert len(rows) == 9 and set(rows.values()) == {"not run"}


def test_table_from_fuzz_json_overload_and_soak(tmp_path):
    path = tmp_path / "fuzz.json"
    path.write_text(json.dumps({
        "http.raw_bytes": {"examples": 100, "failures": 0},
        "grpc.generate_fields": {"examples": 40, "failures": 2},
        "params.sampling": {"tried": 60, "failed_invocations": 0, "falsified": False, "profile": "ci"},
        "batch_invariance": {"trials": 1000, "mismatches": 1},
        "not_a_property": 3,
    }))
    fuzz = rr.read_fuzz(str(path))
    assert set(fuzz) == {"http.raw_bytes", "grpc.generate_fields", "params.sampling", "batch_invariance"}
    assert rr.read_fuzz(str(tmp_path / "missing.json")) is None
    wire = {"requests": 50, "completed": 10, "refused": 40, "lost": 0, "refusal_ms_p50": 3.0, "refusal_ms_p99": 12.5,
            "refusal_ms_max": 13.0}
    overload = {"capacity": 10, "clients": 50, "rounds": 1, "refusal_ms_p99": 12.5, "lost": 0, "pages_leaked": 0,
                "http": wire, "grpc": wire}
    soak = {"minutes": 3.0, "clients": 4, "requests": 900, "errors": 0, "rss_mb_first": 900.0, "rss_mb_last": 901.0,
            "mb_per_hour": 4.25, "num_samples": 60, "compiles_after_warmup": 0, "pages_leaked": 0}
    table = rr.build_table(fuzz, overload, soak)
    rows = _rows(table)
    assert rows["Fuzz cases tried"] == "200" and rows["Fuzz failures"] == "2"
    assert rows["Isolation trials"] == "1000" and rows["Isolation mismatches"] == "1"
    assert rows["p99 rejection latency (overload, 5x capacity)"] == "12.5 ms"
    assert rows["Requests lost under overload"] == "0"
    assert rows["Pages leaked (idle after overload / soak)"] == "0"
    assert rows["Memory growth after warm-up"] == "4.25 MB/hour"
    assert rows["Compiles after warm-up (soak)"] == "0"
    assert "| http | 50 | 10 | 40 | 0 | 3.0 ms | 12.5 ms | 13.0 ms |" in table
    assert "| grpc.generate_fields | 40 | 2 |" in table
    # only the soak ran: the overload rows say so, the pages row is the soak's
    rows = _rows(rr.build_table(None, None, soak))
    assert rows["p99 rejection latency (overload, 5x capacity)"] == "not run"
    assert rows["Pages leaked (idle after overload / soak)"] == "0"


def test_percentile_nearest_rank():
    assert rr.percentile([], 99) is None
    values = list(range(1, 101))
    assert rr.percentile(values, 99) == 99 and rr.percentile(values, 50) == 50 and rr.percentile([7.0], 99) == 7.0
