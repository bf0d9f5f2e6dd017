# converters are added by the model issue
