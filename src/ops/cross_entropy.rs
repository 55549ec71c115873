//! Cross-entropy at label rows with a fused backward, and no-grad token statistics (entropy, argmax).
