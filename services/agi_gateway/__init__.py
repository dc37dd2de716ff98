"""FastAGI gateway: talks to Asterisk, collects the customer id, routes the call."""
