"""The demo model pipeline (bebop_spec.demo): corpus, math reward, tokenizer, micro build.

Fast (about 20 s on 2 cores): the build runs the real stages at toy sizes
(`DemoBuildConfig.micro`). Run: python -m pytest -q tests/demo/test_demo.py
"""

from __future__ import annotations

import ast
import dataclasses
import json
import random
import re

import pytest

from bebop_spec.demo.build import DemoBuildConfig, build_demo, default_cache_dir, is_built
from bebop_spec.demo.chat import IM_END, SPECIAL_TOKENS, assistant_spans, render_chat
from bebop_spec.demo.corpus import (
    CorpusConfig,
    build_examples,
    extract_answer,
    make_math_problem,
    reward,
)
from bebop_spec.demo.math_task import NUMBER_CAPS

SMALL_CORPUS = CorpusConfig(math_train=200, math_heldout=50, agent_train=60, agent_heldout=20,
                            code_train_chars=20_000, code_heldout_chars=5_000)  # fmt: skip
EQUATION = re.compile(r"(-?\d+) ([-+*/]) (\d+) = (-?\d+)")


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """One micro build shared by the tests below: (config, target_dir)."""
    cfg = DemoBuildConfig.micro(tmp_path_factory.mktemp("demo"))
    return cfg, build_demo(cfg, progress=False)


@pytest.fixture(scope="module")
def tokenizer(micro):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(micro[1])


# --- math task ---------------------------------------------------------------------------


def test_math_problems_are_deterministic_and_correct():
    """Same rng seed -> same problems; every equation in a solution is true arithmetic, and the
    solution ends in '#### answer' with the answer extractable."""
    a = [make_math_problem(random.Random(7)) for _ in range(3)]
    b = [make_math_problem(random.Random(7)) for _ in range(3)]
    assert a == b
    rng = random.Random(0)
    for _ in range(500):
        question, solution, answer = make_math_problem(rng)
        assert question.endswith("?") and solution.endswith(f"#### {answer}")
        assert extract_answer(solution) == answer and answer >= 0
        for x, op, y, z in EQUATION.findall(solution):
            x, y, z = int(x), int(y), int(z)
            assert {"+": x + y, "-": x - y, "*": x * y, "/": x // y}[op] == z
            assert op != "/" or x % y == 0


def test_math_difficulty_spans_steps_and_number_sizes():
    """Problems range from 1 to 4 operations and over every number cap, so a small model can
    get some but not all of them right (the RL task needs a non-trivial success rate)."""
    rng = random.Random(1)
    # sentences = the start + one per operation + the question (a share question has its own)
    steps = {make_math_problem(rng)[0].count(".") - 1 for _ in range(400)}
    assert steps == {1, 2, 3, 4}
    q, _, _ = make_math_problem(random.Random(2), num_steps=1, level=0)
    assert max(int(n) for n in re.findall(r"\d+", q)) <= NUMBER_CAPS[0]


@pytest.mark.parametrize(
    "text, expected",
    [("#### 42", 42), ("so\n#### -3\n", -3), ("#### 1\n#### 2", 2), ("####42", 42),
     ("#### 12 apples", 12), ("no answer", None), ("#### 4.5", None), ("#### ", None)],
)  # fmt: skip
def test_extract_answer(text, expected):
    """The answer is the integer after the last '####'; decimals and missing answers are None."""
    assert extract_answer(text) == expected


def test_reward_is_binary_on_the_final_answer():
    """The reward is 1.0 when the answer after '####' is right, 0.0 when it is wrong or missing."""
    assert reward("7 + 5 = 12.\n#### 12", 12) == 1.0
    assert reward("7 + 5 = 12.\n#### 13", 12) == 0.0
    assert reward("12", 12) == 0.0  # no '####': wrong format earns nothing


# --- corpus ------------------------------------------------------------------------------


def test_corpus_is_deterministic_and_splits_are_disjoint():
    """Same (config, seed) -> identical examples; another seed changes them; held-out math
    questions, agent dialogues and code files never appear in training."""
    a, b = build_examples(SMALL_CORPUS, 0), build_examples(SMALL_CORPUS, 0)
    assert {k: [e.to_json() for e in v] for k, v in a.items()} == {
        k: [e.to_json() for e in v] for k, v in b.items()
    }
    other = build_examples(SMALL_CORPUS, 1)
    assert [e.to_json() for e in other["math", "train"]] != [
        e.to_json() for e in a["math", "train"]
    ]
    for domain in ("math", "agent"):
        train = {e.text for e in a[domain, "train"]}
        assert not train & {e.text for e in a[domain, "heldout"]}
    path = re.compile(r"from (\S+):")
    train_files = {path.search(e.messages[0]["content"])[1] for e in a["code", "train"]}
    heldout_files = {path.search(e.messages[0]["content"])[1] for e in a["code", "heldout"]}
    assert train_files and heldout_files and not train_files & heldout_files


def test_examples_are_chat_dialogues_ending_with_the_response():
    """Every example is user-or-system first, assistant last; math carries its answer; code
    prompt + body parse as one Python function."""
    ex = build_examples(SMALL_CORPUS, 0)
    for (domain, _), examples in ex.items():
        for e in examples:
            assert e.messages[-1]["role"] == "assistant" and e.domain == domain
            assert e.prompt_messages and e.prompt_messages[-1]["role"] in ("user", "tool")
    for e in ex["math", "train"]:
        assert extract_answer(e.messages[-1]["content"]) == e.answer
    for e in ex["code", "train"][:50]:
        header = e.messages[0]["content"].split("\n\n", 1)[1]
        tree = ast.parse(header + "\n" + e.messages[1]["content"])
        assert isinstance(tree.body[0], (ast.FunctionDef, ast.AsyncFunctionDef))


def test_agent_dialogues_call_listed_tools_with_valid_json():
    """Tool calls are JSON naming a tool from the system prompt; tool results are JSON; the
    calculator result is exact and the final answer quotes it."""
    for e in build_examples(SMALL_CORPUS, 0)["agent", "train"]:
        listed = {json.loads(line)["name"] for line in e.messages[0]["content"].splitlines()[1:-1]}
        calls = [
            m for m in e.messages if m["role"] == "assistant" and "<tool_call>" in m["content"]
        ]
        assert calls
        for m in calls:
            call = json.loads(
                m["content"].removeprefix("<tool_call>\n").removesuffix("\n</tool_call>")
            )
            assert call["name"] in listed
            if call["name"] == "calculator":
                value = eval(call["arguments"]["expression"])  # corpus ints
                assert str(value) in e.messages[-1]["content"]
        assert all(json.loads(m["content"]) for m in e.messages if m["role"] == "tool")


def test_assistant_spans_cover_reply_and_im_end():
    """assistant_spans cover exactly each assistant reply plus its <|im_end|> in the rendered
    chat."""
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"},
                {"role": "tool", "content": "{}"}, {"role": "assistant", "content": "bc"}]  # fmt: skip
    text = render_chat(messages)
    assert [text[a:b] for a, b in assistant_spans(messages)] == ["a" + IM_END, "bc" + IM_END]


# --- tokenizer ---------------------------------------------------------------------------


def test_tokenizer_round_trip_and_special_tokens(tokenizer):
    """Byte-level BPE without a normaliser is lossless; special ids are fixed; digits are
    single tokens (keeps arithmetic digit-wise); eos is <|im_end|>."""
    for s in ["héllo  wörld\n\tdef f(x):\n    return x ** 2  # 日本語 🎉", "", "  \n\n x"]:
        assert tokenizer.decode(tokenizer.encode(s, add_special_tokens=False)) == s
    assert tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS) == [0, 1, 2, 3]
    assert tokenizer.eos_token == IM_END and tokenizer.pad_token_id == 3
    digits = [t for t in tokenizer.tokenize("x = 12345") if t.strip("Ġ").isdigit()]
    assert digits == list("12345")
    assert tokenizer.encode("<|im_start|>", add_special_tokens=False) == [1]


def test_chat_template_matches_the_training_renderer(tokenizer):
    """apply_chat_template gives exactly the text the model was trained on (render_chat),
    with and without the generation prompt, and works on ids."""
    for e in build_examples(SMALL_CORPUS, 0)["agent", "heldout"][:3]:
        for gen in (False, True):
            msgs = e.prompt_messages if gen else e.messages
            text = tokenizer.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
            assert text == render_chat(msgs, add_generation_prompt=gen)
    out = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True
    )
    ids = out["input_ids"] if hasattr(out, "keys") else out
    assert tokenizer.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


# --- build -------------------------------------------------------------------------------


def test_micro_build_loads_with_transformers(micro, tokenizer):
    """The built directory loads with AutoModelForCausalLM (Qwen3, tied embeddings,
    safetensors) and generates; the report and training artefacts exist."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg, target_dir = micro
    model = AutoModelForCausalLM.from_pretrained(target_dir)
    assert model.config.model_type == "qwen3" and model.config.tie_word_embeddings
    assert model.config.vocab_size == len(tokenizer) and (target_dir / "model.safetensors").exists()
    assert {"train_log.jsonl", "training_curve.png", "tokenizer.json"} <= {
        p.name for p in target_dir.iterdir()
    }
    ids = torch.tensor([tokenizer.encode("Mia has", add_special_tokens=False)])
    out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=3)
    assert out.shape[1] <= ids.shape[1] + 3
    report = json.loads(cfg.report_path.read_text())
    assert set(report["heldout"]) == {"math", "code", "agent"}
    assert set(report["math_accuracy"]) == {"greedy", "T=1"}
    assert all(r["entropy"] is None or r["entropy"] > 0 for r in report["heldout"].values())


def test_stages_are_cached_and_invalidated_by_config(micro):
    """A second build reuses every stage; changing only the eval config re-runs only eval;
    a head hook runs once into head/ and is then cached too."""
    cfg, target_dir = micro
    assert is_built(cfg)
    mtime = (target_dir / "model.safetensors").stat().st_mtime_ns
    build_demo(cfg, progress=False)
    assert (target_dir / "model.safetensors").stat().st_mtime_ns == mtime
    cfg2 = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, math_problems=2))
    assert not is_built(cfg2)
    calls = []

    def head(target, out):
        calls.append(target)
        (out / "head.txt").write_text("ok")

    build_demo(cfg2, train_head=head, progress=False)
    build_demo(cfg2, train_head=head, progress=False)
    assert (target_dir / "model.safetensors").stat().st_mtime_ns == mtime
    assert json.loads(cfg2.report_path.read_text())["math_accuracy"]["greedy"]["n"] == 2
    assert calls == [target_dir] and (cfg2.head_dir / "head.txt").read_text() == "ok"


def test_stage_hashes_chain(tmp_path):
    """A stage's hash changes with its own config and with every stage before it, never with
    a later one; the cache location is not part of it."""
    base = DemoBuildConfig(cache_dir=tmp_path)
    h = base.stage_hashes()
    assert DemoBuildConfig(cache_dir=tmp_path / "elsewhere").stage_hashes() == h
    bigger = dataclasses.replace(base.target, steps=base.target.steps + 1)
    h2 = dataclasses.replace(base, target=bigger).stage_hashes()
    assert [h[k] == h2[k] for k in h] == [True, True, False, False]
    h3 = dataclasses.replace(base, seed=1).stage_hashes()
    assert all(h[k] != h3[k] for k in h)


def test_target_training_is_deterministic(micro, tmp_path):
    """Same seed and thread count -> bit-identical weights."""
    from bebop_spec.demo.target import train_target

    cfg, target_dir = micro
    train_target(cfg.target, cfg.seed, cfg.corpus_dir, cfg.tokenizer_dir, tmp_path, progress=False)
    assert (tmp_path / "model.safetensors").read_bytes() == (
        target_dir / "model.safetensors"
    ).read_bytes()


def test_default_cache_dir_honours_env(monkeypatch, tmp_path):
    """The demo cache is $BEBOP_CACHE_DIR/demo, else $XDG_CACHE_HOME/bebop/demo; a config's
    target_dir sits under its cache_dir."""
    monkeypatch.delenv("BEBOP_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "bebop" / "demo"
    monkeypatch.setenv("BEBOP_CACHE_DIR", str(tmp_path / "b"))
    assert default_cache_dir() == tmp_path / "b" / "demo"
    assert DemoBuildConfig(cache_dir=tmp_path / "c").target_dir == tmp_path / "c" / "target"
