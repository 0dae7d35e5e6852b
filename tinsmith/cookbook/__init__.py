"""The cookbook's building blocks, importable on their own.

- `renderers`: conversations -> tokens and loss weights from the model's own chat template.
- `hyperparams`: recommended LoRA learning rates, schedules, batch scaling.
- `datasets`: conversation, prompt/completion and preference-pair loaders; RL env interfaces.
- `arithmetic`: seeded arithmetic word problems with `\\boxed{}` answers and their grader.
- `rl`: group advantages, episode datums, the policy-gradient step, KL to a reference.
- `tools`: tool-use environments (a safe calculator, a search over `search_index`).
- `search_index`: a small BM25 index and a made-up knowledge base with lookup questions.
- `inspect_provider`: an Inspect AI model provider (`--model tinsmith/<base model>`).
- `transcripts`: self-contained HTML transcripts of sampled conversations and episodes.
- `logs`: metrics.jsonl per step, a console table, progress, optional TensorBoard / W&B.
- `recipe`: the shared recipe plumbing (key=value config, embedded server, resume).

Recipes built from them live in `tinsmith.recipes` (`python -m tinsmith.recipes.<name>`).
Everything here talks to a server only through the official `tinker` SDK.
"""
