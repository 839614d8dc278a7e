"""other tools: PEFT export and import, the command line."""
