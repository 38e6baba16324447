//! The HTTPS step-up endpoint: a TOTP code in, a short-lived step-up token out.
