"""The silo agent: accepts release plans from the gateway only, computes bounded aggregates in its
own database with SQL it compiles itself, adds OpenDP noise, and returns only noisy values."""
