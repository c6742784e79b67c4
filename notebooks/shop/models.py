from django.db import models


class Order(models.Model):
    """An order; ``number`` is unique so that a duplicate raises IntegrityError."""

    number = models.IntegerField(unique=True)
    customer = models.CharField(max_length=100, default="")

    def __str__(self) -> str:
        return f"Order {self.number}"
