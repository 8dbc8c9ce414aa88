"""Runtime-policy tools (``keytrio policy``): create a policy, sign it (DSSE) and verify it."""
