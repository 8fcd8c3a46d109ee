"""What train.py needs besides the method: the plumbing a reader of the training loop can skip.

    files.py          read_json, fetch (verified download), atomic_write, read_table, held (locks)
    tokenizer.py      load_tokenizer: tokenizer.json, or vocab.txt with the folder's casing
    glue_download.py  the GLUE download, each file checked against its published sha256
    system.py         torchrun, devices, autocast, CPU memory (glibc)
    checks.py         prepare_inputs: every input checked before any work; user_errors
    run_state.py      Run: a run's folder, checkpoints without pickle, log.jsonl, best/, resume
    labelling.py      forward_batches, predict_encoded, predict_tasks, Labeller (one pass for all tasks)
    corpus.py         --predict: a corpus file labelled in chunks (ids, scores, torchrun)
    submission.py     the GLUE leaderboard's files, and write_test_predictions
    plot.py           training.png from log.jsonl (needs matplotlib); the run's last lines

Each module imports only the six files' lower layers and the modules above it in this list, never
train.py (test_the_six_files_keep_their_layering).
"""
