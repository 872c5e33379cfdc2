"""Decoding: the static-cache decoders of the teacher and of the push-forward student.

    generate        generate_ar and generate_kforcing: static-cache decoding with coupled noise, compiled steps and
                    CUDA graphs
    engine          RoundLoop: the round loop every decoder shares (output, progress, EOS, stopping, statistics)
    request         what every decoder does with a request: its checks, its prompts split for the prefill, its
                    uniforms as one table, the masking after EOS
    prefill         the prefill passes every decoder runs alike (so their caches hold the same bits)
    steps           the teacher's KV cache, and a step run eagerly, compiled, or replayed as a CUDA graph
    compiled        torch.compile'd steps and rounds, compiled once per process and shape

A draft student's verified and unverified decoding is `kforcing.students.draft.decode`. Imports teachers/, models/
and below.
"""
