"""Evaluation: how well each variant predicts a dataset's answers, and where it changed.

Every variant (the base, an attached adapter, a weighted combination, a merged folder loaded beside the session,
a GGUF export run by llama.cpp) reads each example's prompt + reference answer in one teacher-forced pass; on the
answer's tokens we record the variant's loss (mean negative log-likelihood, nats per token), next-token accuracy
(its greedy choice equals the answer's token) and KL(p_reference || p_variant) against a reference variant.
Differences from the reference come with a paired bootstrap confidence interval over the examples, so that a user
sees whether a difference is more than noise.

* :mod:`.datasets` -- evaluation sets from local files (the training data's shapes) and their defaults;
* :mod:`.scoring` -- the batched teacher-forced forward passes (one mixed-adapter batch for every variant of the
  session) and the per-token maths;
* :mod:`.stats` -- token-weighted means, the paired bootstrap, regressions;
* :mod:`.columns` -- what is scored: the session's variants and GGUF files run by llama.cpp;
* :mod:`.run` -- the job: :func:`evaluate` and its result;
* :mod:`.provenance` -- the base and each variant with its paths and hashes, for the result and for Compare's report;
* :mod:`.scale` -- per-adapter scales (PEFT's LoRA scaling at run time) and the scale sweep.
"""
