"""The package's import graph: no cycles, and no module imports from a layer above its own (the
graph is read from the source, module-level imports only)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# lowest first; a module may import from its own layer or any below it
LAYERS = [
    # foundations: no steer-heal imports above plain helpers
    ["steer_heal", "steer_heal.setting", "steer_heal.chat", "steer_heal.errors", "steer_heal.console",
     "steer_heal.tracking",
     "steer_heal.rundir", "steer_heal.presets", "steer_heal.presets.check",
     "steer_heal.presets.text", "steer_heal.tiny", "steer_heal.attention", "steer_heal.models",
     "steer_heal.evals",
     "steer_heal.evals.protocol", "steer_heal.evals.mfv_data", "steer_heal.heal.kl", "steer_heal.grpo",
     "steer_heal.grpo.distributed", "steer_heal.grpo.penalty", "steer_heal.grpo.advantage", "steer_heal.grpo.objective",
     "steer_heal.steering.core",
     "steer_heal.engine.vllm_models", "steer_heal.engine.vllm_worker", "steer_heal.stats", "steer_heal.machine"],
    # tensors and models: steering, logprobs, the heal, the student, score primitives, figures
    ["steer_heal.logprobs", "steer_heal.kvcache", "steer_heal.steering", "steer_heal.steering.hooks",
     "steer_heal.steering.extract",
     "steer_heal.heal", "steer_heal.heal.train", "steer_heal.student", "reward.scores", "steer_heal.report"],
    # rollout engines
    ["steer_heal.engine", "steer_heal.engine.base", "steer_heal.engine.hf", "steer_heal.engine.vllm_engine"],
    # what uses an engine: rewards, evaluations, the dose
    ["reward", "reward.components", "reward.trl_rewards", "reward.validation", "steer_heal.evals.mfv",
     "steer_heal.evals.student", "steer_heal.dose"],
    # settings (they embed the reward's and the engine's sections)
    ["steer_heal.config"],
    # the shared stages and the online trainer's parts
    ["steer_heal.stages", "steer_heal.grpo.rollout", "steer_heal.grpo.trainer"],
    # drivers
    ["steer_heal.loop", "steer_heal.grpo.online"],
    # studies: what is measured, then the analysis over rows, then the runs, the evaluation and the driver
    ["steer_heal.study", "steer_heal.study.measures", "steer_heal.study.analysis", "steer_heal.study.verdicts",
     "steer_heal.study.heal", "steer_heal.study.tables", "steer_heal.study.figures"],
    ["steer_heal.study.config", "steer_heal.study.arms", "steer_heal.study.evaluate", "steer_heal.study.cache"],
    ["steer_heal.study.driver"],
    # the command line
    ["steer_heal.cli"],
]
RANK = {m: i for i, layer in enumerate(LAYERS) for m in layer}


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted((ROOT / "steer_heal").rglob("*.py")) + sorted((ROOT / "reward").rglob("*.py")):
        name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def _graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    g = {}
    for m, p in mods.items():
        deps = set()
        for n in ast.parse(p.read_text()).body:
            if isinstance(n, ast.ImportFrom) and n.module:
                subs = {f"{n.module}.{a.name}" for a in n.names} & set(mods)
                deps |= subs or ({n.module} & set(mods))  # `from pkg import module` needs the module only
            elif isinstance(n, ast.Import):
                deps |= {a.name for a in n.names} & set(mods)
        g[m] = deps - {m}
    return g


def test_every_module_has_a_layer():
    assert sorted(set(_modules()) - set(RANK)) == [], "add new modules to LAYERS"


def test_no_upward_imports():
    g = _graph(_modules())
    bad = [(m, d) for m, ds in g.items() for d in ds if RANK[d] > RANK[m]]
    assert bad == []


def test_no_import_cycles():
    g = _graph(_modules())
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for d in sorted(g[m]):
            assert state.get(d) != 1, " -> ".join(path + [d])
            if d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
