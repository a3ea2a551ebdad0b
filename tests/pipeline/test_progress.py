"""The terminal progress of a job's stages: plain lines for logs, one redrawn line on a TTY."""

from __future__ import annotations

import io

import pytest

from pipeline.progress import StageProgress, format_bytes, is_live


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_are_periodic_with_failures_and_a_final_line():
    lines: list[str] = []
    clock = FakeClock()
    p = StageProgress("runs", 4, echo=lines.append, interval=10, clock=clock)
    p.update("complete", "sub-01", nbytes=1024)
    assert lines == []  # not yet: one line per interval
    clock.now += 11
    p.update("skipped", "sub-02")
    assert lines == ["runs: 2/4 (1 complete, 1 skipped, 0 failed) in 11.0 s, 1.00 kiB read"]
    p.update("failed", "sub-03", error="boom")  # failures are always printed
    assert lines[-1] == "runs: sub-03 failed: boom"
    p.update("complete", "sub-04", nbytes=1024)
    clock.now += 1
    p.close()
    p.close()  # once
    assert lines[-1] == "runs: 4/4 (2 complete, 1 skipped, 1 failed) in 12.0 s, 2.00 kiB read"
    assert len(lines) == 3
    assert p.counts == {"complete": 2, "skipped": 1, "failed": 1} and p.bytes_read == 2048


def test_live_line_is_redrawn_in_place():
    stream = FakeTTY()
    lines: list[str] = []
    clock = FakeClock()
    p = StageProgress("ingest", 2, echo=lines.append, live=True, stream=stream, width=10,
                      clock=clock, labels={"complete": "ingested"})
    p.update("complete", "sub-01")
    p.update("failed", "sub-02", error="truncated")
    p.close()
    out = stream.getvalue()
    draws = out.split("\r")
    assert "ingest [----------] 0/2" in draws[1]
    assert "ingest [#####-----] 1/2 (1 ingested, 0 skipped, 0 failed)" in out
    assert out.endswith("ingest [##########] 2/2 (1 ingested, 0 skipped, 1 failed) in 0.0 s\n")
    assert "\n" not in out[:-1]  # a single terminal line, rewritten
    assert lines == ["ingest: sub-02 failed: truncated"]  # above the bar, through echo


def test_is_live_only_for_default_printers_on_a_terminal():
    import click

    assert is_live(print, FakeTTY()) and is_live(click.echo, FakeTTY())
    assert not is_live(print, io.StringIO())
    assert not is_live(lambda *a: None, FakeTTY())  # silenced / captured output


def test_bad_status_and_bytes_format():
    p = StageProgress("runs", 1, echo=lambda *a: None)
    with pytest.raises(ValueError, match="status must be one of"):
        p.update("done")
    assert format_bytes(None) == "n/a" and format_bytes(512) == "512 B"
    assert format_bytes(3 * 1024**3) == "3.00 GiB"


def test_ingest_reports_each_run_as_it_finishes(tmp_path):
    """Without a client (local threads): one callback per run, with the number of runs."""
    import storage
    from pipeline.simulate import simulate_dataset

    sim = simulate_dataset(tmp_path / "derivs", n_subjects=3, shape=(8, 9, 8), n_volumes=20,
                           seed=1)
    seen: list[tuple[str, str, int]] = []
    frame = storage.ingest(sim.root, tmp_path / "s.zarr",
                           progress=lambda row, n: seen.append((row["run_id"], row["action"],
                                                                n)))
    assert sorted(seen) == sorted((r, "ingested", 3) for r in frame["run_id"])
    sizes = {r.bold.name.removesuffix("_desc-preproc_bold.nii.gz"): r.bold.stat().st_size
             for r in sim.runs}
    assert dict(zip(frame["run_id"], frame["source_bytes"], strict=True)) == sizes
    seen.clear()
    again = storage.ingest(sim.root, tmp_path / "s.zarr", progress=lambda row, n: seen.append(
        (row["run_id"], row["action"], n)))
    assert {a for _, a, _ in seen} == {"skipped"} and (again["source_bytes"] == 0).all()
