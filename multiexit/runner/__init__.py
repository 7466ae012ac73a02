"""The runner behind ``run_glue_with_exits.py``: its flags and checks (:mod:`.args`), loading the model, tokenizer
and data (:mod:`.loading`), the training loop with exact resume (:mod:`.training`), evaluation with replay, online
exit and the results files (:mod:`.evaluation`), and the linear script that ties them together (:mod:`.main`)."""
