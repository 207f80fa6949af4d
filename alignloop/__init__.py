"""alignloop: a self-hosted workbench for prompting, instruction-tuning and aligning your own assistant model.

Three layers, one direction: `alignloop.core` (the kernel), the stages (`annotate`, `sft`, `reward`, `rl`,
`serve`), and the application (`alignloop.cli`, `parser`, `web`, `console`, `jobs`, `rounds`). This package
itself imports nothing, so importing any layer does not drag in the others.
"""
