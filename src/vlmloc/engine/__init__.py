"""The circuit engine: interventions on a loaded VLM, per batch row, through one hook core.

It never knows which experiment it serves; the runner (`vlmloc.runner`) hands it prepared
batches and per-row edits realized from conditions (`vlmloc.conditions`).

| module | what it does |
|---|---|
| `hooks` | the hook core: the only code that registers hooks or reads transformers' keyword arguments (`Hooks`, `Call`) |
| `token_edits` | replace / copy visual tokens at the LM input (`TokenEdit`, `edit_lm_input`) |
| `knockout` | block attention from query to key positions in chosen layers (`Knockout`, `knockout`) |
| `heads` | patch or ablate attention heads' outputs; restart a forward from a layer (`HeadEdit`, `edit_heads`) |
| `readout` | what is read out: yes/no margin, teacher-forced answer log-probability, greedy answers |
| `mediation` | causal mediation: patch each head from a source run into a base run, MF per head |
| `attribution` | integrated gradients over the visual tokens |
| `capture` | visual-token activations at every stage (vision layers, projector, LM layers) |
| `visual_features` | projector inputs and outputs; prepared batches of samples |
| `mean_embedding`, `head_means` | the mean visual embedding and mean head outputs (ablation values) |
| `prefix` | reuse of the image prefix's KV cache for interventions after the image |

Usage::

    from vlmloc.engine.knockout import Knockout, knockout
    from vlmloc.engine.readout import next_token_logprobs

    with knockout(adapter, [Knockout.make(queries, keys, range(0, 6)), Knockout.none()]):
        logprobs = next_token_logprobs(adapter, batch)      # row 0 knocked out, row 1 clean
"""
