//! Step-up MFA for human operators: TOTP secrets, codes, step-up tokens and failure limits.
