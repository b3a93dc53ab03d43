"""Ollama: the project's one way to ask models served by Ollama servers.

- `pool`:     OllamaPool, concurrent structured-output (and plain) chat requests to one model on many
              hosts, with retries, a disk cache and a request log; every caller goes through it
              (the Ollama teacher, the PPO and Gym judges, `rlhf eval`);
- `hosts`:    `--ollama_host` / $OLLAMA_HOST parsed into URLs, and the check that a host serves the model;
- `failures`: what can go wrong, one tag each, and the checks that assign the tags;
- `guard`:    when a judge's failed judgements stop the run;
- `names`:    Ollama model names (`[namespace/]model[:tag]`) and the default model.
Pushing an exported model to a server is export's job (`rlhf.export.push`), on the same hosts.
"""
