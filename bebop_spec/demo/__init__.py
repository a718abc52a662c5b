"""The built-in demo model: a small Qwen3 trained offline on math, stdlib code and tool calls.

    from bebop_spec.demo.build import ensure_demo
    model_dir = ensure_demo()          # builds once (about 6 min on 2 idle cores), then cached

Modules: `corpus` (+ `math_task`, `code_task`, `agent_task`), `chat`, `tokenizer`, `target`,
`evaluate`, `build`. See docs/demo.md.
"""
