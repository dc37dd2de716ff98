"""CRM resolvers: answer identification requests from the cache or the CRM."""
