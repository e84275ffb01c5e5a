"""The one evaluation every arm gets: the base model (as a Student, so a trained arm loads its cumulative
adapter), the runs' own scorer and a held-out judge, the round-0 vector and its iso-KL doses, the capability
items and the vignettes; and the fingerprints that say which cached evaluation is still valid."""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict
from pathlib import Path

import torch
import yaml

from reward.components import heldout_scorer
from reward.validation import DATA as LABELLED
from reward.validation import load_labelled, score_labelled, trait_gap
from reward.validation import report as validation_report
from steer_heal import stages
from steer_heal.chat import encode_prompt, render_prompt
from steer_heal.engine import Sampling
from steer_heal.evals.mfv import evaluate_mfv, nanmean, trait_nats
from steer_heal.evals.mfv_data import is_labelled
from steer_heal.evals.student import SCORED
from steer_heal.heal.kl import aggregate, chunked_kl_and_logp
from steer_heal.logprobs import auto_chunk, final_hidden, lm_logits, pack
from steer_heal.models import causal_lm
from steer_heal.presets import load_preset
from steer_heal.rundir import write_atomic
from steer_heal.steering import Steering, SteeringVector
from steer_heal.steering.hooks import steer
from steer_heal.study.config import Arm, CompareConfig, CompareError

EVAL_VERSION = 3  # bump when a measure of the evaluation changes (2: incoh_ctx, dev/test split; 3: capability)
CAPABILITY = Path(__file__).resolve().parents[1] / "evals" / "capability.yaml"


def _hash(d) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _file_hash(p: Path) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()[:12] if Path(p).exists() else ""


def preset_hash(name: str) -> str:
    """The preset's YAML and every set file it names or includes (a shipped preset: its YAML and its contexts)."""
    return "".join(_file_hash(f) for f in load_preset(name, check=False).sources)


def arm_fingerprint(ev_fp: str, arm: "Arm", adapter: Path | None) -> str:
    """An evaluation's key: the evaluator's, the arm's definition, and the bytes of the adapter it loads."""
    d = dict(ev=ev_fp, kind=arm.kind, overrides=arm.overrides if arm.kind in ("steer", "prompt") else {})
    if adapter is not None:
        d["adapter"] = _file_hash(Path(adapter) / "adapter_model.safetensors") or str(adapter)
    return _hash(d)


class Evaluator:
    """Holds the base model (as a Student, so trained arms load their cumulative adapter), the two
    scorers, the round-0 vector and dose, and the vignettes; evaluates any arm the same way."""

    def __init__(self, cfg: CompareConfig):
        self.cfg = cfg
        rc = cfg.run_config()
        p = stages.run_preset(rc)  # refused before the model loads
        if not (p.eval_persona_pos and p.eval_persona_neg):
            raise CompareError(f"preset '{p.name}' has no held-out eval_persona_pos/neg; fix: add them (written for "
                               "evaluation only) so arms are not judged by the reward's own context")
        # what each cache depends on: the model, the preset's files, the settings, the labelled replies, the
        # evaluation's own code; a cache made under another of these is not reused
        base = dict(model=cfg.model, dtype=cfg.dtype, preset=preset_hash(cfg.preset), eval_version=EVAL_VERSION,
                    capability=_file_hash(CAPABILITY))
        self.fp_vector = _hash(base | dict(steer=asdict(cfg.steer)))
        self.fp_judges = _hash(base | dict(labelled=_file_hash(LABELLED)))
        self.fp_eval = _hash(base | dict(steer=asdict(cfg.steer), eval=asdict(cfg.eval)))
        self.b = stages.build(rc, engine_seed=0)
        self.preset = p = self.b.preset
        self.student, self.tok, self.engine = self.b.student, self.b.tok, self.b.engine
        self.users = p.split(cfg.eval.split)[:cfg.eval.eval_prompts]
        self.scorer = stages.scorer(self.b)  # coherence components, the runs' own scorer
        self.heldout = heldout_scorer(self.student.model, self.tok, p, ref_ctx=self.student.base)
        self.v0, self.kappa0 = self._vector()
        cap = yaml.safe_load(CAPABILITY.read_text())["items"]
        self.cap_q = [x["q"] for x in cap]
        self.cap_a = [self.tok(x["a"], add_special_tokens=False).input_ids + [self.tok.eos_token_id] for x in cap]
        self.scorer.vector = self.v0

    def _vector(self) -> tuple[SteeringVector, float]:
        """The base model's vector and its iso-KL dose, computed once and cached in the compare dir."""
        vp = self.cfg.dir / f"vector_r0-{self.fp_vector}.safetensors"
        if vp.exists():
            v = SteeringVector.load(vp)
        else:
            v = stages.extract(self.b)  # no adapter is loaded yet: the base model's vector
            self.cfg.dir.mkdir(parents=True, exist_ok=True)
            v.save(vp)
        return v, self.dose(self.cfg.steer.target_kl, v)

    def dose(self, target_kl: float, v: SteeringVector | None = None) -> float:
        """The iso-KL dose of the base vector at `target_kl` (p95 nats), cached in steer.json."""
        sp = self.cfg.dir / f"steer-{self.fp_vector}.json"
        cache = json.loads(sp.read_text()) if sp.exists() else {}
        by = cache.get("by_target", {})
        key = f"{float(target_kl):g}"
        if key not in by:
            c, _ = stages.calibrate(self.b, v or self.v0, target_kl=float(target_kl))
            by[key] = c
            cache["by_target"] = by
            if float(target_kl) == float(self.cfg.steer.target_kl):
                cache["kappa"] = c
            write_atomic(sp, json.dumps(cache))
        return by[key]

    def judges(self) -> dict[str, float]:
        """Each judge's AUROC on the project's labelled replies for this preset (cached in judges.json):
        the held-out trait_llr, the reward-context trait_llr, the projection, incoherence, verbalisation
        and refusal, each for its target label."""
        f = self.cfg.dir / f"judges-{self.fp_judges}.json"
        if f.exists():
            return json.loads(f.read_text())
        items = load_labelled().get(self.preset.name, [])
        out: dict[str, float] = {}
        if items:
            labels = [x["label"] for x in items]
            with self.student.base():
                comp = score_labelled(self.scorer, items, which=SCORED + ["trait_projection"])
                held = score_labelled(self.heldout, items, which=["trait_llr", "incoh_ctx"])
            rows = {r["component"]: r["auroc"] for r in validation_report(comp, labels)}
            held_rows = {r["component"]: r["auroc"] for r in validation_report(held, labels)}
            out = dict(trait_llr_reward_ctx=rows.get("trait_llr", float("nan")),
                       projection=rows.get("trait_projection", float("nan")),
                       incoherence=rows.get("incoherence", float("nan")),
                       verbalisation=rows.get("verbalisation", float("nan")),
                       refusal=rows.get("refusal", float("nan")),
                       trait_llr_heldout=held_rows.get("trait_llr", float("nan")),
                       incoh_ctx=held_rows.get("incoh_ctx", float("nan")))
            gap = trait_gap(held, items, "incoh_ctx")  # reads the trait? (pos - neg on the same prompts)
            out["incoh_ctx_trait_gap"] = [gap.value, gap.lo, gap.hi]
            old = trait_gap(comp, items, "incoherence")
            out["incoherence_trait_gap"] = [old.value, old.lo, old.hi]
        write_atomic(f, json.dumps(out))
        return out

    def evaluate(self, arm: "Arm", adapter: Path | None = None) -> dict:
        """Every measure for one arm, per item and summarised: the student as the arm leaves it, on
        prompts and vignettes no arm trained on."""
        kind = arm.kind
        system = self.preset.persona_pos if kind == "prompt" else None
        steering, extra = None, {}
        if kind == "steer":
            t = float(arm.overrides.get("target_kl", self.cfg.steer.target_kl))
            steering = Steering(self.v0, self.dose(t))
            extra = dict(target_kl=t, kappa=steering.coeff)
        if adapter is not None:
            self.student.load_cumulative(adapter)
            ctx = self.student.live_off
        else:
            ctx = self.student.base
        with ctx():
            prompts = [render_prompt(self.tok, u, system=system) for u in self.users]
            ro = self.engine.generate(prompts, steering, Sampling(max_new_tokens=self.cfg.eval.eval_max_new_tokens,
                                                                   temperature=0.0), logprobs=False)
            ids, texts = [r.completion_ids for r in ro], [r.text for r in ro]
            kl = kl_to_base(self.student, self.tok, [r.prompt_ids for r in ro], ids,
                            [encode_prompt(self.tok, render_prompt(self.tok, u)) for u in self.users], steering)
            e = self.cfg.eval
            # capability next to trait: neutral reference answers, teacher-forced (NLL, and KL to base there)
            cap = kl_to_base(self.student, self.tok, [encode_prompt(self.tok, render_prompt(self.tok, q, system=system))
                                                      for q in self.cap_q], self.cap_a,
                             [encode_prompt(self.tok, render_prompt(self.tok, q)) for q in self.cap_q], steering)
            mfv = evaluate_mfv(self.student.model, self.tok, self.b.mfv_rows, e.think_tokens, e.mfv_batch_size,
                               steering, progress=False, read=e.mfv_read, system=system) if self.b.mfv_rows else None
        # scored under the base model with the plain prompt: the persona prompt is not part of the judge
        comp = self.scorer.components(self.users, ids, texts, which=SCORED + ["trait_projection"])
        # incoh_ctx: the reply's best of plain / either held-out side, so it does not read the trait
        held = self.heldout.components(self.users, ids, texts, which=["trait_llr", "incoh_ctx"])
        items = dict(trait_llr_heldout=held["trait_llr"], trait_llr_reward_ctx=comp["trait_llr"],
                     projection=comp["trait_projection"], incoh_ctx=held["incoh_ctx"], incoherence=comp["incoherence"],
                     tail_nll=comp["tail_nll"],
                     repetition=comp["repetition"], coherent=[float(c) for c in self.scorer.coherent(comp)],
                     verbalisation=comp["verbalisation"], refusal=comp["refusal"], kl_rmse=kl["rmse"],
                     kl_mean=kl["mean"], cap_nll=cap["nll"], cap_kl=cap["mean"])
        items = {k: [_finite(x) for x in v] for k, v in items.items()}
        out = {k: nanmean(v) for k, v in items.items()} | extra
        if mfv is not None:
            items.update(mfv_p=[x["p"] if x["top1"] >= 0 and is_labelled(r) else [float("nan")] * 7
                                for x, r in zip(mfv.rows, self.b.mfv_rows)],
                         mfv_pmass=[_finite(x["pmass_allowed"]) for x in mfv.rows],
                         mfv_nll_prefill=[_finite(x["nll_prefill"]) for x in mfv.rows])
            out.update(trait_nats=trait_nats(mfv, self.preset.foundations), pmass=mfv.pmass_allowed,
                       nll_prefill=mfv.nll_prefill, unscorable=mfv.frac_unscorable, profile=mfv.profile)
        # the think traces stay in the evaluation cache (not in compare.jsonl): the MFV gap's text-side diagnosis
        think = [[x["think_fwd"], x["think_rev"]] for x in mfv.rows] if mfv is not None else []
        return out | dict(items=items, texts=texts, prompts=self.users, mfv_think=think)


def _finite(x: float) -> float:
    """NaN for a value that is not finite (an empty answer's tail NLL): skipped by every mean."""
    return float(x) if math.isfinite(x) else float("nan")


@torch.no_grad()
def kl_to_base(student, tok, prompt_ids, completion_ids, base_prompt_ids, steering) -> dict:
    """Per-sequence rmse and mean over completion positions of the exact KL(student || base), where
    the student reads its own prompt (persona prompt, steering) and the base the plain one, and the
    student's mean NLL of the completion tokens; NaN for an empty answer."""
    model = student.model
    n_all = len(completion_ids)
    out = dict(rmse=[float("nan")] * n_all, mean=[float("nan")] * n_all, nll=[float("nan")] * n_all)
    keep = [i for i, c in enumerate(completion_ids) if c]
    if not keep:
        return out
    a = pack([prompt_ids[i] for i in keep], [completion_ids[i] for i in keep], tok.pad_token_id)
    b = pack([base_prompt_ids[i] for i in keep], [completion_ids[i] for i in keep], tok.pad_token_id)
    device = next(model.parameters()).device
    a, b = a.to(device), b.to(device)
    ba, sa, tgt = a.targets()
    bb, sb, _ = b.targets()
    with steer(model, steering):
        h_s = final_hidden(model, a.input_ids, a.attention_mask)[ba, sa]
    with student.base():
        h_b = final_hidden(model, b.input_ids, b.attention_mask)[bb, sb]
    vocab = causal_lm(model).get_output_embeddings().weight.shape[0]
    kl, lp = chunked_kl_and_logp(h_s, h_b, tgt, lambda x: lm_logits(model, x), auto_chunk(vocab))
    n = len(keep)
    for agg in ("rmse", "mean"):
        for i, x in zip(keep, aggregate(kl, ba, n, agg).tolist()):
            out[agg][i] = float(x)
    for i, x in zip(keep, aggregate(-lp.float(), ba, n, "mean").tolist()):  # the student's NLL of the tokens
        out["nll"][i] = float(x)
    return out
