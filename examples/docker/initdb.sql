-- Run once by the postgres image's entrypoint when the data volume is new.
-- The roles the quickstart identities log in as, and a table worth stealing.
CREATE ROLE billing LOGIN;
CREATE ROLE alice LOGIN;
-- Exists so that the laptop's refusal is the policy's doing, not a missing role.
CREATE ROLE "finance-laptop" LOGIN;
CREATE TABLE invoices (
    id       int PRIMARY KEY,
    customer text NOT NULL,
    amount   numeric(10, 2) NOT NULL
);
INSERT INTO invoices VALUES (1, 'Acme Corp', 1200.00), (2, 'Globex', 830.50), (3, 'Initech', 2169.50);
GRANT SELECT ON invoices TO billing, alice;
