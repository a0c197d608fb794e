"""Zero-shot evaluation tasks with lm-evaluation-harness's protocols, read from the offline data
folder: registry (names, files), prompts (documents -> requests), scoring (log-likelihoods),
metrics (acc, acc_norm, perplexity with standard errors) and the runner."""
