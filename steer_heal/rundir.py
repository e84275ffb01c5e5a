"""Run directory: resolved config, append-only events, one row per completed round, artefacts.

A round is complete when its row is in rounds.jsonl; the row is appended last, after the round's
adapter, vector and samples are on disk, so a killed run resumes after its last row.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml


class RunDirError(ValueError):
    """A run directory that cannot be used; the message names the fix."""


def _clean(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _append_line(path: Path, obj: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(_clean(obj)) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line torn by a kill: everything before it is intact
            break
    return out


# the student each driver's row describes: the iterative row's healed student, the online row's baked one
_ITERATIVE = {"trait": "trait_healed", "coherence": "coh_healed", "incoherence": "incoherence_healed",
              "tail_nll": "tail_nll_healed", "repetition": "repetition_healed", "trait_heldout": "trait_heldout_healed",
              "d_trait_nats": "d_trait_nats_healed"}
RECORD_FILES = {"rounds.jsonl": ("round", "round_{:02d}"), "bakes.jsonl": ("bake", "bake_{:02d}")}


@dataclass
class Record:
    """One round (iterative loop) or bake (online run), under the same keys whichever driver wrote it: what a
    consumer (the study, its drift table, resume) reads. Each driver builds it with `student_record` and appends
    it inside its row (`row["record"]`); `Record.of` reads it back."""
    index: int
    gen_tokens: int | None
    kappa: float | None
    doses: list[float] | None  # the doses its rollouts were generated at, as the run logged them
    trait: float | None
    coherence: float | None
    incoherence: float | None
    tail_nll: float | None
    repetition: float | None
    trait_heldout: float | None
    barrier_active_frac: float | None
    D_mean: float | None
    D_rmse: float | None
    D_p95: float | None
    D_max: float | None
    d_trait_nats: float | None  # the MFV trait against base (where the run evaluated it)
    trained_tokens: int | None  # tokens the loss read (the heal's, each epoch counted; online: since the last bake)
    opt_steps: int | None  # optimizer steps
    lr_sum: float | None  # their summed learning rate
    adapter: str  # the cumulative adapter after it, relative to the run directory
    seconds: float = 0.0

    @classmethod
    def of(cls, row: dict) -> "Record":
        if "record" in row:
            return cls(**row["record"])
        return _written_before_records(row)


# the student scores a Record carries, as stages.student_eval names them
STUDENT_KEYS = ("trait", "coherence", "incoherence", "tail_nll", "repetition", "trait_heldout")
SPEND_KEYS = ("trained_tokens", "opt_steps", "lr_sum", "barrier_active_frac", "D_mean", "D_rmse", "D_p95", "D_max")


def student_record(index: int, adapter: str, scores: dict, d_trait_nats: float | None, row: dict) -> Record:
    """The Record of the student a round / bake ends with, built the same way by both drivers: `scores` is that
    student's stages.student_eval dict (the loop's healed student, the online run's baked one); `row` the round /
    bake row, whose shared columns (gen_tokens, kappa, doses, seconds, SPEND_KEYS) both drivers name alike."""
    doses = row.get("doses")
    return Record(index=index, gen_tokens=row.get("gen_tokens"), kappa=row.get("kappa"),
                  doses=None if doses is None else [float(x) for x in doses],
                  **{k: scores.get(k) for k in STUDENT_KEYS}, d_trait_nats=d_trait_nats,
                  **{k: row.get(k) for k in SPEND_KEYS}, adapter=adapter, seconds=float(row.get("seconds") or 0.0))


def _written_before_records(row: dict) -> Record:
    """A row appended before the drivers wrote `record` (the committed studies, runs started earlier): the
    student's scores read under each driver's own column names (the iterative row's healed student)."""
    iterative = "round" in row
    key = (lambda k: _ITERATIVE.get(k, k)) if iterative else (lambda k: k)
    idx = int(row["round" if iterative else "bake"])
    return student_record(idx, (f"round_{idx:02d}" if iterative else f"bake_{idx:02d}") + "/cumulative",
                          {k: row.get(key(k)) for k in STUDENT_KEYS}, row.get(key("d_trait_nats")), row)


def read_records(d: str | Path) -> list[Record]:
    """A run directory's rounds or bakes as Records (the driver that wrote them need not be known)."""
    for f in RECORD_FILES:
        if (Path(d) / f).exists():
            return [Record.of(r) for r in read_jsonl(Path(d) / f)]
    return []


class RunDir:
    """`cfg` is any config with `to_dict()` and `fingerprint()` (the iterative RunConfig, the online one)."""

    def __init__(self, path: str | Path, cfg, resume: bool = False, rows_file: str = "rounds.jsonl",
                 table_file: str = "round_table.md", write: bool = True):
        self.path = Path(path)
        self.cfg = cfg
        self.rows_file, self.table_file = rows_file, table_file
        if not write:  # non-main ranks of a distributed run read nothing and write nothing here
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write_test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise RunDirError(f"run directory '{self.path}' is not writable ({e.strerror}); "
                              "fix: pass run_dir=<a writable folder>") from None
        cfg_file, fp_file = self.path / "config.yaml", self.path / "fingerprint.txt"
        if fp_file.exists():
            if fp_file.read_text().strip() != cfg.fingerprint():
                raise RunDirError(f"run directory '{self.path}' was made with another config; fix: resume with "
                                  f"`--resume {self.path}` alone (it reads its config.yaml) or use a new run_dir")
            if not resume and self.rows():
                raise RunDirError(f"run directory '{self.path}' already holds rounds; fix: add `--resume` or "
                                  "pick a new run_dir")
        write_atomic(cfg_file, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        write_atomic(fp_file, cfg.fingerprint() + "\n")

    # ---------------------------------------------------------------- files
    def round_dir(self, r: int) -> Path:
        d = self.path / f"round_{r:02d}"
        d.mkdir(exist_ok=True)
        return d

    def event(self, kind: str, **kw) -> None:
        _append_line(self.path / "events.jsonl", {"t": round(time.time(), 3), "event": kind, **kw})

    def rows(self) -> list[dict]:
        return read_jsonl(self.path / self.rows_file)

    def append_row(self, row: dict, record: Record, columns=None) -> None:
        """Append a round / bake: the driver's own row with the shared Record inside it (one line, so a kill
        cannot leave one without the other)."""
        _append_line(self.path / self.rows_file, row | {"record": asdict(record)})
        write_atomic(self.path / self.table_file, format_table(self.rows(), markdown=True, columns=columns))

    def truncate_rows(self, keep) -> None:
        """Keep only rows for which keep(row) holds (a resumed run drops rows past its checkpoint)."""
        rows = [r for r in self.rows() if keep(r)]
        write_atomic(self.path / self.rows_file, "".join(json.dumps(_clean(r)) + "\n" for r in rows))

    def save_json(self, rel: str, obj) -> None:
        p = self.path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(p, json.dumps(_clean(obj), indent=1))

    def load_json(self, rel: str):
        p = self.path / rel
        return json.loads(p.read_text()) if p.exists() else None


COLUMNS = [("round", "r", "{:d}"), ("kappa", "kappa", "{:.3g}"), ("generated", "gen", "{:d}"), ("kept", "kept", "{:d}"),
           ("gen_tokens", "gen_tok", "{:d}"),
           ("heal_nll", "heal_nll", "{:.3f}"), ("val_nll", "val_nll", "{:.3f}"), ("heal_D", "D", "{:.3f}"),
           ("trait_steered", "trait_st", "{:+.3f}"), ("trait_healed", "trait_he", "{:+.3f}"),
           ("trait_nats_steered", "tnats_st", "{:+.2f}"), ("trait_nats_healed", "tnats_he", "{:+.2f}"),
           ("d_trait_nats_healed", "dtn_he", "{:+.2f}"), ("pmass_healed", "pmass_he", "{:.3f}"),
           ("nll_prefill_healed", "nllpre_he", "{:.2f}"), ("unscorable_healed", "unsc_he", "{:.2f}"),
           ("coh_steered", "coh_st", "{:.2f}"), ("coh_healed", "coh_he", "{:.2f}"),
           ("tail_nll_healed", "tailnll_he", "{:.2f}"), ("cos_r0", "cos_r0", "{:.3f}"),
           ("shift_cos", "shift_cos", "{:+.3f}"), ("seconds", "sec", "{:.0f}")]

# the online run's bake table: one row per bake (the student unsteered; s_* = student-side scores)
BAKE_COLUMNS = [("bake", "bake", "{:d}"), ("step", "step", "{:d}"), ("gen_tokens", "gen_tok", "{:d}"),
                ("kappa", "kappa", "{:.3g}"), ("cos_r0", "cos_r0", "{:.3f}"), ("reward", "reward", "{:+.3f}"),
                ("keep_frac", "keep", "{:.2f}"), ("kl_rmse", "kl_rmse", "{:.3f}"),
                ("adv_dose_corr", "A~dose", "{:+.2f}"), ("shift_cos", "shift_cos", "{:+.3f}"),
                ("trait", "s_trait", "{:+.3f}"), ("incoherence", "s_incoh", "{:.2f}"),
                ("coherence", "s_coh", "{:.2f}"), ("verbalisation", "s_verb", "{:.2f}"),
                ("refusal", "s_refus", "{:.2f}"),
                ("trait_nats", "trait_nats", "{:+.2f}"), ("d_trait_nats", "d_tnats", "{:+.2f}"),
                ("pmass", "pmass", "{:.3f}"), ("nll_prefill", "nll_pre", "{:.2f}"), ("unscorable", "unsc", "{:.2f}"),
                ("surgical", "surgical", "{}"), ("seconds", "sec", "{:.0f}")]


def fmt_cell(v, f):
    if v is None:
        return "-"
    try:
        return f.format(v)
    except (ValueError, TypeError):
        return str(v)


def format_table(rows: list[dict], markdown: bool = False, base: dict | None = None, columns=None) -> str:
    columns = columns or COLUMNS
    cols = [c for c in columns if any(c[0] in r for r in rows)] or columns
    head = [c[1] for c in cols]
    body = [[fmt_cell(r.get(k), f) for k, _, f in cols] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(b) + " |" for b in body]) + "\n"
    w = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    line = lambda xs: "  ".join(x.rjust(n) for x, n in zip(xs, w))  # noqa: E731
    out = [line(head)] + [line(b) for b in body]
    if base:
        m = base.get("mfv")
        tn = m.get("trait_nats") if m else None  # None: a trait with no moral-foundations axis
        extra = ((f"  trait_nats {tn:+.2f}" if tn is not None else "") + f"  pmass {m['pmass_allowed']:.3f}  "
                 f"nll_prefill {m['nll_prefill']:.2f}  unscorable {m['frac_unscorable']:.2f}") if m else ""
        out.insert(0, f"base: trait {base.get('trait', 0):+.3f}  coherence {base.get('coherence', 0):.2f}  "
                      f"tail_nll {base.get('tail_nll', 0):.2f}" + extra)
    return "\n".join(out)
