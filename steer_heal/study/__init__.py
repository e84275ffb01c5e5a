"""Studies: arms side by side at a matched budget, one evaluation, verdicts a reviewer can check.

    config    the study config (arms, seeds, declared questions), checked before anything runs
    arms      training arms as their own processes; what each ran with, read from its run directory
    evaluate  the one Evaluator and its fingerprints
    cache     the study folder's merged config and cached evaluations
    driver    run_compare, merge_study, report_from (`steer-heal compare`)
    measures  the measure catalogue and the notes the report prints
    analysis  Study: rows -> values, intervals, paired differences
    verdicts  primary (Holm, seeds-only sensitivity) and exploratory lines
    heal      heal gain, retention, MFV transfer, the seed's questions
    tables    compare.md's sections, drift.md, dose_sweep.md
    figures   dose sweep, drift, frontier, the README's lead figure; HTML pages embed the PNG
"""
