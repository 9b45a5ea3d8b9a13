"""`idefics3 eval`: the model card's benchmarks with their official metrics, on the continuous-batching engine.

    idefics3 eval --task docvqa --data ~/data/DocVQA --limit 500
    idefics3 eval --task mmmu,mathvista,mmstar,docvqa,textvqa --data-root ~/data --output results/ --resume
    idefics3 eval --task textvqa --data ~/data/textvqa --server http://127.0.0.1:8000/v1
    torchrun --nproc_per_node 8 -m idefics3.eval --task docvqa ...

One concept per module: `benchmarks/` (the task table: columns, prompts, scoring per benchmark), `metrics/` (the
official scoring rules), `prompts.py` (the prompt table and its overrides), `layouts.py` + `data.py` (finding and
reading the published parquet layouts, images decoded lazily), `inputs.py` + `runner.py` (engine-driven
generation), `client.py` (any OpenAI-compatible server instead), `records.py` (the per-sample JSONL, resuming),
`distributed.py` (torchrun shards), `harness.py` (one run), `results.py` (results JSON and the table),
`progress.py`, and `cli.py` (the command's flags). Other packages add tasks by passing them to the parser (the
built-in demo adds `shapes`, its held-out check).
"""
