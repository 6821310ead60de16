"""Special tokens of the MOSS conversation format, in one place.

End tokens are single vocabulary entries (user-defined symbols of our SentencePiece model);
role markers (`<|Human|>:` ...) are plain text, as in the released MOSS tokenizer.
"""

END_OF_HUMAN = "<eoh>"
END_OF_THOUGHTS = "<eot>"
END_OF_COMMANDS = "<eoc>"
END_OF_RESULTS = "<eor>"
END_OF_MOSS = "<eom>"
END_TOKENS = (END_OF_HUMAN, END_OF_THOUGHTS, END_OF_COMMANDS, END_OF_RESULTS, END_OF_MOSS)

# Preference (quality) tags for preference-aware training. The tag format is our design (MOSS
# never published one); 8 are reserved in the vocabulary, a run uses the first K (default 3).
MAX_QUALITY_TAGS = 8
QUALITY_TAGS = tuple(f"<|quality_{i}|>" for i in range(MAX_QUALITY_TAGS))

USER_DEFINED_SYMBOLS = END_TOKENS + QUALITY_TAGS

ROLE_HUMAN = "<|Human|>"
ROLE_THOUGHTS = "<|Inner Thoughts|>"
ROLE_COMMANDS = "<|Commands|>"
ROLE_RESULTS = "<|Results|>"
ROLE_MOSS = "<|MOSS|>"
