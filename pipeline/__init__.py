"""`llmx pipeline`: convert -> quantize -> build -> eval -> bench from one recipe, cached per stage, gated.

`plan` turns a recipe into each stage's options (paths resolved, cross-section checks done), `keys` says
which inputs each stage's cache key covers, `hash_cache` remembers file content hashes, `records` and
`workdir` hold what a finished stage leaves behind, `stages` runs each stage through the library APIs,
`gates` judges the eval and bench results, `runner` orchestrates, `junit` and `summary` write the reports.
Nothing here imports torch at module level; the stages import the library lazily.
"""
