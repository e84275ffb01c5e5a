"""Online GRPO heal on TRL (pinned trl==1.16.0): steered rollouts + RMSE reverse-KL penalty."""
