"""Decoding: every way of turning a model and prompts into tokens.

    generate        generate_ar and generate_kforcing: static-cache decoding with coupled noise, compiled steps and
                    CUDA graphs; draft students dispatch to draft_decode
    draft_decode    generate_with_drafts: verified (lossless) and unverified decoding with a draft student
    draft_policy    adaptive drafting: how many drafts each round makes, from measured acceptance and round cost
    speculative     speculative sampling's accept/resample rule (lossless in distribution)
    request         checks of a decode request shared by every decoder, and masking after EOS

Imports students/, teachers/, models/ and below.
"""
