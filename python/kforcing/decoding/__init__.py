"""Decoding: the static-cache decoders of the teacher and of the push-forward student.

    generate        generate_ar and generate_kforcing: static-cache decoding with coupled noise, compiled steps and
                    CUDA graphs
    engine          RoundLoop: the round loop every decoder shares (output, progress, EOS, stopping, statistics)
    compiled        torch.compile'd steps and rounds, compiled once per process and shape
    request         checks of a decode request shared by every decoder, and masking after EOS

A draft student's verified and unverified decoding is `kforcing.students.draft.decode`. Imports teachers/, models/
and below.
"""
